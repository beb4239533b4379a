"""SHA-256 of a whole file: the one checksum the workbench records and checks (embedded model
builds, activation-store shards, run-folder parts).

Read in 1 MiB blocks, so a multi-GB shard or GGUF never sits in memory.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

BLOCK = 1 << 20


def sha256_stream(f: BinaryIO) -> str:
    """The hex SHA-256 of everything left in the binary file object ``f``."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(BLOCK), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the local file at ``path``."""
    with open(path, "rb") as f:
        return sha256_stream(f)
