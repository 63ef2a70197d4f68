"""One builder at a time for what the data cache holds (a tokenizer, a split's tokens).

Under torchrun or srun every rank starts the same program: without a lock each one trains the same tokenizer
or tokenizes the same split, with that much more memory on the node. The writes are atomic either way, so the
lock only saves work; where a file system refuses locks, the builds go on unlocked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no flock; each process builds on its own, as before
    fcntl = None  # type: ignore[assignment]


@contextmanager
def exclusive_build(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` while building `what`; other holders wait for it.

    The caller checks again, inside the block, whether `what` is there by now: a process that waited
    usually finds it built. flock locks die with their process, so a builder that crashes or is killed
    never leaves the others waiting; the lock file itself stays (it is empty and harmless).
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "ab") as handle:
        locked = _acquire(handle, lock_file, what)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle: object, lock_file: Path, what: str) -> bool:
    """Take the lock, saying so when another process holds it; False when it cannot be had at all."""
    if fcntl is None:
        return False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building %s (lock %s)", what, lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as error:  # e.g. ENOLCK on a network mount without a lock manager
        log.warning("cannot lock %s (%s); building %s without a lock", lock_file, error, what)
        return False
    return True
