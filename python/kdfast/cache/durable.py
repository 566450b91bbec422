"""Safe file I/O for caches: atomic writes, checksums, files opened without following links, a lock.

* :func:`atomic_write` — temporary file, fsync, ``os.replace``, fsync of the directory: a reader
  sees the old file or the new one, never a part. The temporary file is created fresh
  (``O_EXCL``, never through a symbolic link).
* :func:`read_regular_file` / :func:`map_regular_file` — a file's bytes (a manifest) or a
  read-only memory map (a shard), refusing symbolic links and anything but a regular file, so
  that a link planted in a cache directory cannot make kdfast read elsewhere (a link among the
  directories *above* the cache is followed as usual). A map comes with the identity of the file
  it maps (:func:`file_identity`, from the same descriptor), so that a reader can tell a file
  replaced since it was first opened.
* :func:`sha256_hex` — the digest of a buffer, chunk by chunk.
* :class:`WriterLock` — one writer per cache and rank: an exclusive lock held through the
  ``filelock`` package (released by the OS when the process dies); the writer also uses it for
  the directory lock held while it takes its rank's lock or clears a cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import stat

try:
    import filelock
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kdfast.cache needs filelock; install it with: pip install 'kdfast[capture]'"
    ) from exc

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def fsync_dir(path: str) -> None:
    """Make a rename or removal in directory ``path`` durable (where the platform allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        with contextlib.suppress(OSError):  # pragma: no cover - file systems without dir fsync
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically: temp file, fsync, rename, fsync dir."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)  # a leftover of a killed process with this pid (or a planted link)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o644)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def sha256_hex(buffer, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a bytes-like object (a memory map is read chunk by chunk)."""
    view = memoryview(buffer).cast("B")
    h = hashlib.sha256()
    for start in range(0, len(view), chunk):
        h.update(view[start:start + chunk])
    return h.hexdigest()


def _open_regular(path: str, what: str) -> int:
    """A read-only fd of ``path``, which must be a regular file and not a symbolic link."""
    name = os.path.basename(path)
    st = os.lstat(path)  # FileNotFoundError if missing
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{name}: {what} is a symbolic link; kdfast reads only regular files in a cache "
                         f"directory (file {path})")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{name}: {what} is not a regular file (file {path})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _BINARY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise ValueError(f"{name}: {what} is a symbolic link (file {path})") from None
        raise
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise ValueError(f"{name}: {what} changed while it was opened (file {path})")
    return fd


def read_regular_file(path: str, what: str) -> bytes:
    """The bytes of the regular file ``path`` (``FileNotFoundError`` if missing)."""
    fd = _open_regular(path, what)
    with open(fd, "rb") as f:
        return f.read()


def file_identity(st: os.stat_result) -> tuple:
    """What tells one file from its replacement: ``(st_dev, st_ino, st_size, st_mtime_ns)``."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def map_regular_file(path: str, what: str, size: int):
    """``(map, identity)``: a read-only memory map of the regular file ``path``, which must have
    ``size`` bytes, and the :func:`file_identity` of the file mapped (``fstat`` of the same fd).

    ``ValueError`` naming the file if it is missing, a link, not a regular file, or of another
    size ("truncated" / "larger than recorded").
    """
    name = os.path.basename(path)
    try:
        fd = _open_regular(path, what)
    except FileNotFoundError:
        raise ValueError(f"{name}: {what} listed in the manifest is missing from "
                         f"{os.path.dirname(path)}") from None
    try:
        st = os.fstat(fd)
        actual = st.st_size
        if actual != size:
            how = "truncated" if actual < size else "larger than recorded"
            raise ValueError(f"{name}: {what} is {how}: the manifest records {size} bytes, "
                             f"the file has {actual} (file {path})")
        if size == 0:
            raise ValueError(f"{name}: {what} is empty (file {path})")
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ), file_identity(st)
    finally:
        os.close(fd)


class WriterLock:
    """An exclusive lock on the file ``path``: one writer per cache and rank.

    :meth:`acquire` raises ``RuntimeError`` naming the cache directory if another process (or
    another writer in this one) holds it — at once, or after ``timeout`` seconds; the OS releases
    it if the holder dies. Also a context manager (acquire on entry, release on exit).
    """

    def __init__(self, path: str, timeout: float = 0):
        self.path = path
        self._lock = filelock.FileLock(path, timeout=timeout, mode=0o644)

    def acquire(self) -> "WriterLock":
        try:
            self._lock.acquire()
        except filelock.Timeout:
            folder, name = os.path.split(self.path)
            raise RuntimeError(
                f"{folder}: another capture/CacheWriter is writing this cache (another CacheWriter "
                f"holds its lock {name}; one writer per cache and rank)"
            ) from None
        return self

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)
