"""Atomic file writes for the data generators.

A generator that is interrupted must never leave a half-written ``instances.json`` or PNG that a
later run (or the loader) would take for a complete file, so every file is written to a temporary
name in the same folder and moved into place with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Compact, key-order-preserving JSON (byte-identical for identical input)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    write_bytes_atomic(path, text.encode("utf-8"))


def write_pickle_atomic(path: Path, obj: Any) -> None:
    """Protocol 2, the protocol of the original REFER ``refs(*).p`` files."""
    write_bytes_atomic(path, pickle.dumps(obj, protocol=2))
