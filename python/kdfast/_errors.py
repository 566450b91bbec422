"""kdfast's own exception types (the Rust binding raises them too)."""


class DtypeError(TypeError, ValueError):
    """A tensor has the wrong dtype. Both a ``TypeError`` and a ``ValueError``, so either
    ``except`` clause catches it."""
