//! Storage encoding of sparse targets: exact round trips of ids, tails and counts; log-prob
//! quantisation within its stated bound.

use kdfast_core::compress::{compress_sample, compress_topk};
use kdfast_core::encode::{decode, encode, id_bits, Layout, MAX_ABS_ERROR, MIN_LOGPROB};
use kdfast_core::{Isa, Rows};

fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s >> 11
    }
}

#[test]
fn random_targets_round_trip() {
    for &vocab in &[1u64, 2, 3, 127, 32_000, 32_768, 151_936, 1 << 32] {
        for &k in &[1usize, 3, 8, 13, 64] {
            let rows = 5;
            let mut rnd = lcg(vocab ^ (k as u64) << 40);
            let mut ids = vec![0i64; rows * k];
            let mut lp = vec![0f32; rows * k];
            let mut tail = vec![0f32; rows];
            for i in 0..rows * k {
                let unused = rnd().is_multiple_of(5);
                ids[i] = if unused { -1 } else { (rnd() % vocab) as i64 };
                lp[i] = if unused { f32::NEG_INFINITY } else { -((rnd() % 1_000_000) as f32) / 30_000.0 };
            }
            ids[k - 1] = vocab as i64 - 1; // the largest id
            lp[k - 1] = -1.0;
            for t in tail.iter_mut() {
                *t = -((rnd() % 1000) as f32) / 7.0;
            }
            tail[0] = f32::NEG_INFINITY;
            let layout = Layout::new(k, vocab, true, None).unwrap();
            let rb = layout.row_bytes();
            assert_eq!(rb, (k * id_bits(vocab) as usize).div_ceil(8) + 2 * k + 4);
            let mut data = vec![0u8; rows * rb];
            encode(&layout, rows, &ids, &lp, None, Some(&tail), &mut data, 2).unwrap();
            let (mut ids2, mut lp2, mut tail2) = (vec![0i64; rows * k], vec![0f32; rows * k], vec![0f32; rows]);
            decode(&layout, rows, &data, &mut ids2, &mut lp2, None, Some(&mut tail2)).unwrap();
            assert_eq!(ids, ids2, "V={vocab} k={k}");
            assert_eq!(tail.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), tail2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            for (a, b) in lp.iter().zip(&lp2) {
                if *a == f32::NEG_INFINITY {
                    assert_eq!(*b, f32::NEG_INFINITY);
                } else if *a >= MIN_LOGPROB {
                    assert!((a - b).abs() <= MAX_ABS_ERROR, "{a} -> {b}");
                } else {
                    assert_eq!(*b, MIN_LOGPROB);
                }
            }
        }
    }
}

#[test]
fn compressed_targets_round_trip() {
    let (rows, cols, k) = (7, 5000, 24);
    let mut rnd = lcg(3);
    let z: Vec<f32> = (0..rows * cols).map(|_| (rnd() % 20_000) as f32 / 1000.0 - 10.0).collect();
    let rowsv = Rows::new(&z, rows, cols, cols, "t").unwrap();

    let (mut ids, mut lp, mut tail) = (vec![0; rows * k], vec![0.0; rows * k], vec![0.0; rows]);
    compress_topk(rowsv, k, 1.0, &mut ids, &mut lp, &mut tail, Isa::detect(), 2).unwrap();
    let layout = Layout::new(k, cols as u64, true, None).unwrap();
    let mut data = vec![0u8; rows * layout.row_bytes()];
    encode(&layout, rows, &ids, &lp, None, Some(&tail), &mut data, 1).unwrap();
    let (mut ids2, mut lp2, mut tail2) = (vec![0; rows * k], vec![0.0; rows * k], vec![0.0; rows]);
    decode(&layout, rows, &data, &mut ids2, &mut lp2, None, Some(&mut tail2)).unwrap();
    assert_eq!((ids.clone(), tail.clone()), (ids2, tail2));
    assert!(lp.iter().zip(&lp2).all(|(a, b)| (a - b).abs() <= MAX_ABS_ERROR));

    let n = 40;
    let (mut ids, mut lp, mut w) = (vec![0; rows * n], vec![0.0; rows * n], vec![0.0; rows * n]);
    compress_sample(rowsv, n, 1.0, 11, 0, &mut ids, &mut lp, &mut w, Isa::detect(), 2).unwrap();
    let layout = Layout::new(n, cols as u64, false, Some(n as u32)).unwrap();
    let mut data = vec![0u8; rows * layout.row_bytes()];
    encode(&layout, rows, &ids, &lp, Some(&w), None, &mut data, 2).unwrap();
    let (mut ids2, mut lp2, mut w2) = (vec![0; rows * n], vec![0.0; rows * n], vec![0.0; rows * n]);
    decode(&layout, rows, &data, &mut ids2, &mut lp2, Some(&mut w2), None).unwrap();
    assert_eq!(ids, ids2);
    assert_eq!(w, w2, "weights count / N round-trip exactly");
    assert!(lp.iter().zip(&lp2).all(|(a, b)| a == b || (a - b).abs() <= MAX_ABS_ERROR));
}

#[test]
fn bad_input_is_rejected() {
    let layout = Layout::new(2, 10, false, None).unwrap();
    let mut data = vec![0u8; layout.row_bytes()];
    let e = encode(&layout, 1, &[3, 10], &[-1.0, -2.0], None, None, &mut data, 1).unwrap_err().to_string();
    assert!(e.contains("targets.indices"), "{e}");
    let e = encode(&layout, 1, &[3, 4], &[-1.0, f32::NAN], None, None, &mut data, 1).unwrap_err().to_string();
    assert!(e.contains("targets.logprobs"), "{e}");
    let sl = Layout::new(2, 10, false, Some(4)).unwrap();
    let mut data = vec![0u8; sl.row_bytes()];
    let e = encode(&sl, 1, &[3, 4], &[-1.0, -2.0], Some(&[0.3, 0.7]), None, &mut data, 1).unwrap_err().to_string();
    assert!(e.contains("targets.weights"), "{e}");
    assert!(Layout::new(0, 10, false, None).is_err());
    assert!(Layout::new(2, 0, false, None).is_err());
    assert!(Layout::new(2, 10, true, Some(2)).is_err());
    // A corrupt record: an id ≥ V with a used slot.
    let layout = Layout::new(1, 5, false, None).unwrap();
    let data = [7u8, 0, 0];
    let (mut ids, mut lp) = (vec![0i64; 1], vec![0f32; 1]);
    assert!(decode(&layout, 1, &data, &mut ids, &mut lp, None, None).is_err());
}
