"""Pinned outputs of the Rust compressors (issue 12): the exact bytes that ``compress_sample``
and ``compress_topk`` returned before their kernels were rewritten for speed.

A faster kernel must not change a single draw, weight or log-probability of
``compress_sample`` for a given ``(seed, row_offset, logits)`` — stored datasets and the
PyTorch/Triton replays depend on the RNG-stream design — nor the ids of ``compress_topk``.
The sha256 of the outputs on fixed inputs (float32 / bfloat16 / float16, V = 1000, 4097 and
128256, -inf entries and an all -inf vocabulary block) is compared with the digests recorded
from the implementation of commit dbcd84b. Regenerate only for an intended change of outputs:
``python tests/test_compress_pinned.py``.
"""

from __future__ import annotations

import hashlib
import math

import kdfast
import pytest
import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def pinned_logits(n: int, v: int, *, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """LLM-like rows (a Zipf prior, noise, a few boosted ids) with hostile entries: 10 % -inf,
    the ids of block 1 (4096..8191) all -inf in row 1, exact ties in row 2."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(v, generator=g).double()
    z = -torch.log1p(rank) + torch.randn(n, v, generator=g, dtype=torch.float64)
    boost = torch.randint(0, v, (n, min(16, v)), generator=g)
    z.scatter_add_(1, boost, torch.full(boost.shape, 6.0, dtype=torch.float64))
    z *= torch.empty(n, 1, dtype=torch.float64).uniform_(0.7, 1.4, generator=g)
    if v > 1:
        z = z.masked_fill(torch.rand(n, v, generator=g) < 0.1, -math.inf)
        z[:, 0] = z[:, 0].clamp(min=-30.0).nan_to_num(neginf=-30.0)  # every row keeps a finite logit
    if n > 1 and v > 8192:
        z[1, 4096:8192] = -math.inf
    if n > 2 and v > 20:
        z[2, 3:20] = z[2, 5]
    return z.to(dtype)


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


SAMPLE_CASES = [  # (dtype, v, rows, num_samples, temperature, seed, row_offset)
    (dt, v, rows, ns, t, seed, off)
    for dt in DTYPES
    for v, rows in ((1000, 8), (4097, 3), (128256, 4))
    for ns, t, seed, off in ((50, 1.0, 0, 0), (7, 0.7, 2**63 + 5, 12345))
]
TOPK_CASES = [  # (dtype, v, rows, k, temperature)
    (dt, v, rows, k, t) for dt in DTYPES for v, rows in ((1000, 8), (4097, 3), (128256, 4)) for k, t in ((64, 1.0), (5, 0.7))
]


def sample_digest(dt, v, rows, ns, t, seed, off):
    z = pinned_logits(rows, v, seed=v + ns, dtype=DTYPES[dt])
    tg = kdfast.compress_sample(z, ns, temperature=t, seed=seed, row_offset=off, backend="rust")
    return digest(tg.indices, tg.weights, tg.logprobs)


def topk_digest(dt, v, rows, k, t):
    z = pinned_logits(rows, v, seed=v + k, dtype=DTYPES[dt])
    tg = kdfast.compress_topk(z, k, temperature=t, backend="rust")
    return digest(tg.indices), digest(tg.logprobs, tg.tail_logprob)


SAMPLE_DIGESTS: dict[tuple, str] = {
    ('f32', 1000, 8, 50, 1.0, 0, 0): '4e8b8a0af2a33f61',
    ('f32', 1000, 8, 7, 0.7, 9223372036854775813, 12345): '93818887b22229ca',
    ('f32', 4097, 3, 50, 1.0, 0, 0): 'f33ed80389d4e832',
    ('f32', 4097, 3, 7, 0.7, 9223372036854775813, 12345): '108535a37439e923',
    ('f32', 128256, 4, 50, 1.0, 0, 0): '7f7c3f25024e55b5',
    ('f32', 128256, 4, 7, 0.7, 9223372036854775813, 12345): '11f7ad7df6b0d2f6',
    ('bf16', 1000, 8, 50, 1.0, 0, 0): '421c6bfacb0b87a2',
    ('bf16', 1000, 8, 7, 0.7, 9223372036854775813, 12345): '66b250cbf4f44542',
    ('bf16', 4097, 3, 50, 1.0, 0, 0): '780e09ccd838e794',
    ('bf16', 4097, 3, 7, 0.7, 9223372036854775813, 12345): '25b02aaa6874a1d0',
    ('bf16', 128256, 4, 50, 1.0, 0, 0): '5f07819dd39cb9a8',
    ('bf16', 128256, 4, 7, 0.7, 9223372036854775813, 12345): '02cd3e72b8eaa87b',
    ('f16', 1000, 8, 50, 1.0, 0, 0): 'be864d3827fafff6',
    ('f16', 1000, 8, 7, 0.7, 9223372036854775813, 12345): 'fd0893146b40650d',
    ('f16', 4097, 3, 50, 1.0, 0, 0): 'e9be9f122cff331e',
    ('f16', 4097, 3, 7, 0.7, 9223372036854775813, 12345): '271a9bd68c8b6dd5',
    ('f16', 128256, 4, 50, 1.0, 0, 0): 'ccbac79a2fd5e542',
    ('f16', 128256, 4, 7, 0.7, 9223372036854775813, 12345): 'f885915cdcf20ce3',
}
TOPK_DIGESTS: dict[tuple, tuple[str, str]] = {
    ('f32', 1000, 8, 64, 1.0): ('6524863c20dd1665', '155cad4cb2495848'),
    ('f32', 1000, 8, 5, 0.7): ('af0f65af125a6192', '85d8399d9bc2cf16'),
    ('f32', 4097, 3, 64, 1.0): ('13abb95322238fd2', 'd5f5623c55573664'),
    ('f32', 4097, 3, 5, 0.7): ('342e2e0647cd179c', 'c562839c2287997b'),
    ('f32', 128256, 4, 64, 1.0): ('5ce6a565fed57b81', 'ce86cc09f54c6221'),
    ('f32', 128256, 4, 5, 0.7): ('3c32f51dee76c164', 'c975462fbdcbc2b4'),
    ('bf16', 1000, 8, 64, 1.0): ('2114525947c982ee', '558b9fa074b65b3d'),
    ('bf16', 1000, 8, 5, 0.7): ('af0f65af125a6192', '95f0c4e07be055f9'),
    ('bf16', 4097, 3, 64, 1.0): ('5c4323a61fa3b4b9', '4051d383863fdfbe'),
    ('bf16', 4097, 3, 5, 0.7): ('342e2e0647cd179c', 'a7e5414aab5b6385'),
    ('bf16', 128256, 4, 64, 1.0): ('b7608f98a230a60c', '56cb95aab009f2cc'),
    ('bf16', 128256, 4, 5, 0.7): ('3c32f51dee76c164', 'd34acf91c5c6fd88'),
    ('f16', 1000, 8, 64, 1.0): ('23b4c3dbea8df9eb', '5352e3a47d8ea237'),
    ('f16', 1000, 8, 5, 0.7): ('af0f65af125a6192', '17f0a600dc910653'),
    ('f16', 4097, 3, 64, 1.0): ('f1c2511cd1f9ccb3', '660c9a3b82378759'),
    ('f16', 4097, 3, 5, 0.7): ('342e2e0647cd179c', '8c7fc8aa2299b20e'),
    ('f16', 128256, 4, 64, 1.0): ('4451b357ee680467', '0981cd9e89009345'),
    ('f16', 128256, 4, 5, 0.7): ('3c32f51dee76c164', '2cec94ecf4dc2a23'),
}


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sample_outputs_are_pinned(case):
    assert sample_digest(*case) == SAMPLE_DIGESTS[case]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_topk_ids_are_pinned(case):
    assert topk_digest(*case)[0] == TOPK_DIGESTS[case][0]


if __name__ == "__main__":
    print("SAMPLE_DIGESTS = {")
    for c in SAMPLE_CASES:
        print(f"    {c!r}: {sample_digest(*c)!r},")
    print("}")
    print("TOPK_DIGESTS = {")
    for c in TOPK_CASES:
        print(f"    {c!r}: {topk_digest(*c)!r},")
    print("}")
