"""Vocabulary-parallel losses (api.md §6): every rank holds a contiguous slice of the vocabulary.

Reached through the public losses' ``process_group=`` keyword (or a ``DTensor`` sharded on its
last dimension). One module per job:

* :mod:`~kdfast.parallel.collectives` — the all-reduces as autograd functions (the global
  log-sum-exp, the sum over ranks), slice bounds, ``DTensor`` unwrapping;
* :mod:`~kdfast.parallel.dense` — the dense losses of api.md §1;
* :mod:`~kdfast.parallel.akl` — AKL's head found across ranks without gathering the row;
* :mod:`~kdfast.parallel.fused` — the fused linear loss with the heads sharded by rows.
"""
