"""RelationEncoder: a backbone, a prompt template and a pooling mode, as one torch module.

``encoder(input_ids, attention_mask)`` gives one relation vector per prompt; ``encode(pairs)``
is the inference entry point; ``save_pretrained``/``from_pretrained`` read and write a
standard Hugging Face folder whose ``config.json`` carries ``relbert_config`` with the keys of
the public relbert v2 code (``template``, ``aggregation_mode``), so models move both ways.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from relbert_ds import backbones
from relbert_ds.errors import ConfigError, ModelError
from relbert_ds.pooling import DEFAULT_POOLING, POOLING_MODES, pool
from relbert_ds.prompts import DEFAULT_TEMPLATE, MASK, check_template_for_tokenizer, fill_template, resolve_template

Pair = tuple[str, str]
RELBERT_CONFIG_KEY = "relbert_config"
DEFAULT_MAX_LENGTH = 64  # as in the public relbert code


def validate_pairs(pairs: Iterable[Sequence[str]]) -> list[Pair]:
    """Return ``pairs`` as tuples; fail clearly on anything but two non-empty strings."""
    out: list[Pair] = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(w, str) and w.strip() for w in pair):
            raise ConfigError(f"pair #{i} {pair!r} is not two non-empty strings; fix: pass (head, tail) tuples")
        out.append((pair[0], pair[1]))
    return out


class RelationEncoder(torch.nn.Module):
    """Relation embeddings of word pairs from a Hugging Face backbone.

    Args:
        backbone: the bare transformer (``AutoModel``), encoder or decoder-only.
        tokenizer: its tokenizer; must have a pad token (see ``backbones.load_tokenizer``).
        template: an id ``a``-``e`` (RelBERT's manual prompts) or a text with ``<subj>``,
            ``<obj>`` and optionally ``<mask>``.
        pooling: ``average_no_mask`` (default), ``average``, ``mask`` or ``last``.
        max_length: prompts are truncated to this many tokens.
    """

    def __init__(self, backbone: Any, tokenizer: Any, template: str = DEFAULT_TEMPLATE,
                 pooling: str = DEFAULT_POOLING, max_length: int = DEFAULT_MAX_LENGTH,
                 name: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.name = name or getattr(backbone.config, "_name_or_path", "") or "model"
        self.template = resolve_template(template)
        check_template_for_tokenizer(self.template, tokenizer.mask_token, self.name)
        _check_pooling(pooling, self.template)
        self.pooling = pooling
        _check_max_length(max_length)
        self.max_length = max_length
        # The mask token only matters when the template puts one into the prompt.
        self.mask_token_id: int | None = tokenizer.mask_token_id if MASK in self.template else None

    # ---------------------------------------------------------------- construction / saving
    @classmethod
    def from_pretrained(cls, name_or_path: str = backbones.BUNDLED_BACKBONE, *, template: str | None = None,
                        pooling: str | None = None, max_length: int | None = None,
                        trust_remote_code: bool = False, dtype: Any = None) -> "RelationEncoder":
        """Load a backbone, or a RelBERT model saved by relbert-ds or the public relbert code.

        A folder whose ``config.json`` has ``relbert_config`` supplies its template and pooling;
        explicit arguments override them. Without it the defaults are template ``d`` and
        ``average_no_mask`` (the released RelBERT models' choices).
        """
        resolved, config, tokenizer, settings = cls.check_loadable(
            name_or_path, template=template, pooling=pooling, max_length=max_length,
            trust_remote_code=trust_remote_code)
        backbone = backbones.load_backbone(resolved, config=config, trust_remote_code=trust_remote_code, dtype=dtype)
        return cls(backbone, tokenizer, name=name_or_path, **settings)

    @classmethod
    def check_loadable(cls, name_or_path: str, *, template: str | None = None, pooling: str | None = None,
                       max_length: int | None = None, trust_remote_code: bool = False) -> tuple[str, Any, Any, dict]:
        """Everything ``from_pretrained`` checks before reading weights: the model exists, its
        config and tokenizer load, and template/pooling/max_length suit them.

        Cheap, so that every rank of a job can run it and agree on an error before any
        collective. Returns (resolved name, config, tokenizer, encoder settings).
        """
        resolved = backbones.check_model_exists(name_or_path)
        config = backbones.load_config(resolved, trust_remote_code)
        saved = read_relbert_config(config)
        tokenizer = backbones.load_tokenizer(resolved, trust_remote_code)
        template = resolve_template(template or saved.get("template") or DEFAULT_TEMPLATE)
        check_template_for_tokenizer(template, tokenizer.mask_token, name_or_path)
        pooling = pooling or saved.get("aggregation_mode") or DEFAULT_POOLING
        _check_pooling(pooling, template)
        max_length = max_length or saved.get("max_length") or DEFAULT_MAX_LENGTH
        _check_max_length(max_length)
        return resolved, config, tokenizer, {"template": template, "pooling": pooling, "max_length": max_length}

    def relbert_config(self) -> dict[str, Any]:
        """What ``config.json`` stores under ``relbert_config`` (relbert v2 keys + max_length)."""
        return {"template": self.template, "aggregation_mode": self.pooling, "max_length": self.max_length}

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a Hugging Face folder: safetensors weights, tokenizer, config.json with relbert_config.

        ``state_dict`` lets the trainer pass weights consolidated from ZeRO-3 partitions.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.config.update({RELBERT_CONFIG_KEY: self.relbert_config()})
        self.backbone.save_pretrained(str(directory), state_dict=state_dict)
        self.tokenizer.save_pretrained(str(directory))

    # ---------------------------------------------------------------- tokens
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def prompts(self, pairs: Sequence[Pair]) -> list[str]:
        """Prompt text of each pair (``<mask>`` becomes the tokenizer's mask token)."""
        return [fill_template(self.template, h, t, self.tokenizer.mask_token) for h, t in pairs]

    def prompt_lengths(self, pairs: Sequence[Pair]) -> list[int]:
        """Token count of each pair's prompt after truncation (for length bucketing)."""
        ids = self.tokenizer(self.prompts(pairs), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def tokenize(self, pairs: Sequence[Pair], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Padded ``input_ids``/``attention_mask`` for ``pairs`` on ``device`` (default: the model's)."""
        batch = self.tokenizer(self.prompts(pairs), truncation=True, max_length=self.max_length, padding=True,
                               return_tensors="pt", return_token_type_ids=False)
        if self.pooling == "mask":
            has_mask = (batch["input_ids"] == self.mask_token_id).any(dim=1)
            if not bool(has_mask.all()):
                pair = pairs[int((~has_mask).nonzero()[0])]
                raise ConfigError(f"the prompt of pair {pair} lost its mask token to truncation at max_length "
                                  f"{self.max_length}; fix: raise max_length or use a shorter template")
        device = device or self.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    # ---------------------------------------------------------------- compute
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, H) relation vectors in the backbone's dtype."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, input_ids, attention_mask, self.pooling, self.mask_token_id)

    def embed(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """Tokenize and forward ``pairs`` in one batch (autograd as the caller's mode allows)."""
        return self(**self.tokenize(pairs))

    def encode(self, pairs: Iterable[Sequence[str]], batch_size: int = 64, as_tensor: bool = False,
               show_progress: bool = False) -> np.ndarray | torch.Tensor:
        """Relation vectors of ``pairs`` as float32, one row per input pair, in input order.

        Identical pairs are encoded once; prompts are batched by token length (longest first,
        so that running out of memory happens on the first batch, not the last).
        """
        pairs = validate_pairs(pairs)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        unique = list(dict.fromkeys(pairs))
        row_of = {pair: i for i, pair in enumerate(unique)}
        lengths = self.prompt_lengths(unique) if unique else []
        order = sorted(range(len(unique)), key=lambda i: -lengths[i])
        vectors = torch.zeros(len(unique), self.hidden_size, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                starts = range(0, len(order), batch_size)
                if show_progress:
                    from tqdm.auto import tqdm
                    starts = tqdm(starts, desc="encode", unit="batch")
                for start in starts:
                    idx = order[start:start + batch_size]
                    vectors[idx] = self.embed([unique[i] for i in idx]).float().cpu()
        finally:
            self.train(was_training)
        out = vectors[[row_of[p] for p in pairs]] if pairs else vectors
        return out if as_tensor else out.numpy()


def _check_pooling(pooling: str, template: str) -> None:
    if pooling not in POOLING_MODES:
        raise ConfigError(f"unknown pooling {pooling!r}; fix: choose one of {', '.join(POOLING_MODES)}")
    if pooling == "mask" and MASK not in template:
        raise ConfigError("pooling 'mask' needs a template with <mask>; fix: use template a-e or pooling "
                          "average_no_mask")


def _check_max_length(max_length: Any) -> None:
    if not isinstance(max_length, int) or max_length < 8:
        raise ConfigError(f"max_length {max_length!r} is too small; fix: use at least 8 (default 64)")


def read_relbert_config(config: Any) -> dict[str, Any]:
    """``relbert_config`` of a model config, normalised to relbert v2 key names.

    relbert v1 saved ``mode`` where v2 saves ``aggregation_mode``; both are read.
    """
    raw = getattr(config, RELBERT_CONFIG_KEY, None) or {}
    if not isinstance(raw, dict):
        raise ModelError(f"config.json has a malformed {RELBERT_CONFIG_KEY!r} entry; fix: make it an object with "
                         f"'template' and 'aggregation_mode'")
    out = dict(raw)
    if "aggregation_mode" not in out and "mode" in out:
        out["aggregation_mode"] = out["mode"]
    return out
