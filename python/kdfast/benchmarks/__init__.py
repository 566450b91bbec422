"""kdfast's benchmarks, importable so that ``kdfast bench`` can run them.

- :mod:`kdfast.benchmarks.dense`: dense losses (forward KL, JSD), forward + backward, against the
  PyTorch code users write, eager and under ``torch.compile``, with the memory-bandwidth floor.
"""

__all__ = ["dense"]
