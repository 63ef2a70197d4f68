"""Files several processes may write at once, on one machine or on several sharing a file system."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path


def private_suffix() -> str:
    """A temporary-file suffix no other writer uses: process ids repeat across machines (and containers)."""
    return f".{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to disk, so that a crash after a later rename cannot leave it short."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Make the renames into `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
