//! The row-parallel driver and its thread pool.
//!
//! kdfast owns a rayon pool sized by the caller (the Python side passes
//! `torch.get_num_threads()` or `KDFAST_NUM_THREADS`). The pool is rebuilt when the size
//! changes and after `fork()`: a forked child (a DataLoader worker) inherits the parent's pool
//! object but none of its threads, so the pool is keyed by process id and the parent's pool is
//! leaked, never joined, in the child.

use crate::error::Result;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

struct PoolEntry {
    pid: u32,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: Mutex<Option<PoolEntry>> = Mutex::new(None);

/// The pool of `threads` workers for this process.
fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = guard.as_ref() {
        if e.pid == pid && e.threads == threads {
            return e.pool.clone();
        }
    }
    if let Some(old) = guard.take() {
        if old.pid != pid {
            // Inherited through fork(): its threads do not exist here; do not touch them.
            std::mem::forget(old);
        }
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kdfast-{i}"))
            .build()
            .expect("kdfast: could not start worker threads"),
    );
    *guard = Some(PoolEntry { pid, threads, pool: pool.clone() });
    pool
}

/// Call `body(i, &mut items[i])` for every item on `num_threads` threads (serially for 1). An
/// item is one row's outputs (e.g. a tuple of its output slices), so a kernel with several
/// outputs per row writes each row in place. Stops at, and returns, the first error.
pub fn for_each_item<T: Send, F>(items: &mut [T], num_threads: usize, body: F) -> Result<()>
where
    F: Fn(usize, &mut T) -> Result<()> + Sync,
{
    if num_threads <= 1 || items.len() <= 1 {
        return items.iter_mut().enumerate().try_for_each(|(i, t)| body(i, t));
    }
    pool(num_threads).install(|| items.par_iter_mut().enumerate().try_for_each(|(i, t)| body(i, t)))
}

/// Call `body(row, &mut loss[row], grad_row)` for every row, on `num_threads` threads
/// (serially for 1). `grad`, when given, is contiguous with `grad_cols` columns. Stops at,
/// and returns, the first error.
pub fn for_each_row<S: Send, F>(
    loss: &mut [f32],
    grad: Option<&mut [S]>,
    grad_cols: usize,
    num_threads: usize,
    body: F,
) -> Result<()>
where
    F: Fn(usize, &mut f32, Option<&mut [S]>) -> Result<()> + Sync,
{
    if num_threads <= 1 || loss.len() <= 1 {
        return match grad {
            Some(g) => loss.iter_mut().zip(g.chunks_mut(grad_cols.max(1))).enumerate().try_for_each(|(r, (l, g))| body(r, l, Some(g))),
            None => loss.iter_mut().enumerate().try_for_each(|(r, l)| body(r, l, None)),
        };
    }
    pool(num_threads).install(|| match grad {
        Some(g) => loss
            .par_iter_mut()
            .zip(g.par_chunks_mut(grad_cols.max(1)))
            .enumerate()
            .try_for_each(|(r, (l, g))| body(r, l, Some(g))),
        None => loss.par_iter_mut().enumerate().try_for_each(|(r, l)| body(r, l, None)),
    })
}
