"""Every rank plans from the same inputs: a fingerprint of each input, compared across ranks before step 1.

Each rank reads the training data, the validation sets, the DeepSpeed JSON and the model files on its own,
often from its own node's copy on local scratch. A copy that differs (an older data file, another
tokenizer) would train a different plan on that rank without any error. The fingerprints are of what
was read (the parsed records, the resolved config) and of the model folder's files: small files whole,
weight files by size and their first and last MiB (a full hash of tens of GB would delay every start).
"""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from relbert_ds.errors import DataError
from relbert_ds.parallel import collectives, distributed

_WHOLE_FILE_LIMIT = 64 * 2**20  # bytes: larger files are sampled
_SAMPLE = 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def digest_of(value: Any) -> str:
    """sha256 of a JSON rendering of parsed records (tuples and dataclasses as lists and dicts)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_plain).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    return repr(value)


def file_digest(path: Path) -> str:
    """sha256 of a file; for weight files and files over 64 MiB, of its size and first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size <= _WHOLE_FILE_LIMIT and path.suffix not in _WEIGHT_SUFFIXES:
            for block in iter(lambda: fh.read(_SAMPLE), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def model_folder_digests(folder: Optional[str], name: str) -> dict[str, str]:
    """``model file <name>/<file>`` -> digest for the files of a local model folder (config, tokenizer,
    weights); ``name`` is how the user named the model."""
    if folder is None or not Path(folder).is_dir():
        return {}  # a hub id: the hub's copy is the same for every rank
    return {f"model file {name.rstrip('/')}/{p.name}": file_digest(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith(".")}


def analogy_and_model_digests(analogy_sets: Iterable[Any], models: Mapping[str, Optional[str]]) -> dict[str, str]:
    """The digests the trainer and the evaluator both take: each analogy set as parsed, and the files
    of each local model folder (``models``: the name the user gave -> the resolved folder)."""
    out = {f"analogy set {a.name}/{a.split}": digest_of(a.questions) for a in analogy_sets}
    for name, folder in models.items():
        out.update(model_folder_digests(folder, name))
    return out


def check_same_inputs(fingerprints: Callable[[], Mapping[str, str]]) -> None:
    """Compare this rank's fingerprints (input name -> digest) with every other rank's.

    Collective. ``fingerprints`` is called only where there is another rank to compare with (hashing
    data and model files is start-up work a single process does not need). Raises :class:`DataError`
    on every rank, with the same one line (printed once), naming the first rank that read something
    other than rank 0, its host and the input.
    """
    if distributed.world_size() < 2:
        return
    mine = {"host": socket.gethostname(), "rank": distributed.rank(), "inputs": dict(fingerprints())}
    everyone = collectives.all_gather_object(mine)
    message = first_difference(everyone)
    if message is not None:
        error = DataError(message)
        error.agreed = True  # type: ignore[attr-defined]  # the same verdict on every rank: printed once
        raise error


def first_difference(everyone: Iterable[Mapping[str, Any]]) -> Optional[str]:
    """The one-line report of the first rank whose inputs differ from rank 0's, or None."""
    ranks = list(everyone)
    reference = ranks[0]
    for other in ranks[1:]:
        names = sorted(set(reference["inputs"]) | set(other["inputs"]))
        for name in names:
            want, got = reference["inputs"].get(name), other["inputs"].get(name)
            if want != got:
                return (f"rank {other['rank']} on host {other['host']} read a different {name} than rank 0 on host "
                        f"{reference['host']} ({_shown(got)} vs {_shown(want)}); every rank must plan from the same "
                        f"inputs; fix: make that node's copy identical to rank 0's (or put the file on the shared "
                        f"file system every node reads)")
    return None


def _shown(digest: Optional[str]) -> str:
    return f"sha256 {digest}" if digest is not None else "missing"
