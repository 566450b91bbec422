"""Integrations of kdfast's losses with training frameworks.

* :mod:`kdfast.integrations.transformers` — :class:`DistillationTrainer`, a Hugging Face
  ``transformers.Trainer`` that distils from a live teacher model or from a kdfast teacher cache
  (needs ``transformers`` and ``accelerate``; imported on demand, not by ``import kdfast``).
"""
