"""An on-disk cache of relation-vector tables, so that re-running an evaluation does not re-encode.

One file per (model, prompt, pair list): ``<dir>/<key>.npz`` holding the ``(N, H)`` float32
table and the key's ingredients. The key is a SHA-256 of

- the model fingerprint: a hash of every tensor of the encoder's state dict (names, dtypes,
  shapes and bytes) and of its backbone's config, so a retrained or re-exported model never
  hits the vectors of another, whatever its folder is called;
- the template, the pooling and ``max_length``;
- a hash of the pair list (in order).

A file that cannot be read, or whose contents do not match its key (a truncated or foreign
file), is ignored with a warning and re-written after encoding; the cache never makes an
evaluation fail. Files are written to a temporary name and renamed, so a reader never sees a
half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from relbert_ds.data.schemas import Pair

# 2: with classification sets, their pairs are encoded in batches of their own, before the other pairs
# (a pair's vector depends, to rounding, on the pairs padded with it), so format-1 tables are not reused.
FORMAT = 2


def model_fingerprint(encoder: Any) -> str:
    """SHA-256 of the encoder's weights and backbone config (the same on every rank of a job)."""
    digest = hashlib.sha256()
    digest.update(type(encoder).__name__.encode())
    config = getattr(getattr(encoder, "backbone", None), "config", None)
    if config is not None:
        # Where the weights were read from is not part of the model: a copied folder hits the same entry.
        fields = config.to_dict() if hasattr(config, "to_dict") else {"repr": repr(config)}
        for where in ("_name_or_path", "name_or_path", "transformers_version"):
            fields.pop(where, None)
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    state = encoder.state_dict() if isinstance(encoder, torch.nn.Module) else {}
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    if not state:  # a weightless stand-in (tests): its name is all that identifies it
        digest.update(str(getattr(encoder, "name", "")).encode())
    return digest.hexdigest()


def pairs_hash(pairs: Sequence[Pair]) -> str:
    """SHA-256 of the pair list, order included."""
    digest = hashlib.sha256()
    for head, tail in pairs:
        digest.update(head.encode("utf-8") + b"\x00" + tail.encode("utf-8") + b"\x01")
    return digest.hexdigest()


def cache_key(encoder: Any, pairs: Sequence[Pair], fingerprint: Optional[str] = None) -> dict:
    """The key's ingredients (kept in the file) and, under ``"key"``, their hash (the file name)."""
    parts = {"format": FORMAT, "model": fingerprint or model_fingerprint(encoder),
             "template": getattr(encoder, "template", None), "pooling": getattr(encoder, "pooling", None),
             "max_length": getattr(encoder, "max_length", None), "pairs": pairs_hash(pairs), "n_pairs": len(pairs)}
    parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return parts


class VectorCache:
    """Relation-vector tables under one folder (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: dict) -> Path:
        return self.directory / f"{key['key']}.npz"

    def load(self, key: dict, hidden_size: Optional[int] = None) -> Optional[np.ndarray]:
        """The cached table for ``key``, or None (missing; unreadable or mismatched: with a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored = json.loads(str(data["key"]))
                table = np.array(data["table"], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any broken file is a miss, never a failure
            warnings.warn(f"ignoring the unreadable vector cache file {path} ({type(exc).__name__}: {exc}); "
                          "the vectors are encoded again", stacklevel=2)
            return None
        expected_rows = key["n_pairs"]
        if stored != key or table.ndim != 2 or table.shape[0] != expected_rows or (
                hidden_size is not None and table.shape[1] != hidden_size):
            warnings.warn(f"ignoring the vector cache file {path}: its contents do not match its key; the vectors "
                          "are encoded again", stacklevel=2)
            return None
        return table

    def save(self, key: dict, table: np.ndarray) -> Optional[Path]:
        """Write ``table`` for ``key`` atomically; a failure to write is a warning, not an error."""
        tmp: Optional[str] = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=self.directory)
            with os.fdopen(handle, "wb") as out:
                np.savez(out, table=np.asarray(table, dtype=np.float32), key=np.array(json.dumps(key)))
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared like any output
            os.replace(tmp, self.path(key))
            return self.path(key)
        except OSError as exc:
            warnings.warn(f"could not write the vector cache in {self.directory} ({exc}); continuing without it",
                          stacklevel=2)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)  # a disk that filled up mid-write keeps no partial file
            return None
