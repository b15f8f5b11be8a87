"""File helpers shared by the converters, the store and the model checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """SHA-256 of a file's contents, read in blocks (raw archives can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file to disk before it is renamed into place (atomic writes)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
