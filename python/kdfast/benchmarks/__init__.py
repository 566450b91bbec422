"""kdfast's benchmarks, importable so that ``kdfast bench`` can run them. They are tools over
kdfast's public API: they import ``kdfast``, :mod:`kdfast.tiny` and each other, nothing private.

- :mod:`kdfast.benchmarks.harness`: timing, peak memory, machine info, cases in fresh worker
  processes, table helpers — shared by every benchmark (and ``kdfast demo``'s phases);
- :mod:`kdfast.benchmarks.references`: the PyTorch code users write (eager forward KL, TRL's
  JSD), and the random logits the dense benchmarks share;
- :mod:`kdfast.benchmarks.peers`: one adapter per peer library (TRL, torchtune, Liger-Kernel):
  its loss, the mapping of its value onto kdfast's convention, and why it is skipped here;
- :mod:`kdfast.benchmarks.dense`: dense losses (forward KL, JSD, reverse KL), forward + backward,
  against the PyTorch code users write, eager and under ``torch.compile``, and the installed peers,
  with the memory-bandwidth floor; :mod:`kdfast.benchmarks.dense_report` is its table and
  agreement check, :mod:`kdfast.benchmarks.plot` its ``--plot``;
- :mod:`kdfast.benchmarks.offline`: compression, ``sparse_kl``, storage and fidelity of sparse
  targets (a package: one module per part);
- :mod:`kdfast.benchmarks.fused_linear`: ``fused_linear_distill_loss`` against materialised logits;
- :mod:`kdfast.benchmarks.capture`: one ``kdfast capture`` batch through the chunked head against
  materialised logits (extra peak memory, tokens/s);
- :mod:`kdfast.benchmarks.gpu`: the Triton kernels against eager, ``torch.compile`` and Liger.
"""

__all__ = ["harness", "references", "peers", "dense", "dense_report", "plot", "offline", "fused_linear", "capture", "gpu"]
