"""RelationEncoder: a backbone, a prompt template and a pooling mode, as one torch module.

``encoder(input_ids, attention_mask)`` gives one relation vector per prompt; ``encode(pairs)``,
``similarity(a, b)`` and ``analogy(stem, choices)`` are the inference entry points (see
docs/PYTHON_API.md); ``save_pretrained``/``from_pretrained`` read and write a standard Hugging
Face folder whose ``config.json`` carries ``relbert_config`` with the keys of the public relbert
v2 code (``template``, ``aggregation_mode``), so models move both ways. The export also holds a
``pytorch_model.bin`` copy of the weights by default: the public relbert 2.0.2 (transformers
4.21) reads no safetensors.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from relbert_ds.data.schemas import Pair
from relbert_ds.errors import ConfigError, ModelError
from relbert_ds.model import backbones
from relbert_ds.model.batching import plan_batches
from relbert_ds.model.pooling import DEFAULT_POOLING, POOLING_MODES, pool
from relbert_ds.model.prompts import (
    DEFAULT_TEMPLATE,
    MASK,
    check_template_for_tokenizer,
    fill_template,
    resolve_template,
)
from relbert_ds.model.similarity import cosine

PairOrPairs = Union[Sequence[str], Iterable[Sequence[str]]]  # one (head, tail) or many
RELBERT_CONFIG_KEY = "relbert_config"
DEFAULT_MAX_LENGTH = 64  # as in the public relbert code


class UntrainedModelWarning(UserWarning):
    """A model without ``relbert_config`` was loaded: a plain backbone, not trained for relations.

    Its vectors are zero-shot. Silence it with ``from_pretrained(..., warn_untrained=False)``
    or ``warnings.simplefilter("ignore", UntrainedModelWarning)``.
    """


class TruncationWarning(UserWarning):
    """Prompts longer than ``max_length`` tokens were found; they are cut at that length."""


class RankedChoice(NamedTuple):
    """One choice of :meth:`RelationEncoder.analogy`: the pair, its cosine with the stem, its input index."""

    pair: Pair
    score: float
    index: int


def is_single_pair(pairs: Any) -> bool:
    """True for one ``(head, tail)`` (a tuple or list of two strings), False for a collection of pairs."""
    return isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(isinstance(w, str) for w in pairs)


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` (leave the model where it is), ``"auto"`` (CUDA when present, else CPU) or a torch device.

    Checked before any weights are read: a CUDA device that is not there is one clear error.
    """
    if device is None:
        return None
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r} is not a device; fix: pass 'auto' (CUDA when present, else CPU), "
                          f"'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU; fix: pass device='auto' "
                              f"(CUDA when present, else CPU) or 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r} asked for, but torch sees {count} CUDA GPU(s) (cuda:0 to "
                              f"cuda:{count - 1}); fix: pass one of them or 'auto'")
    return resolved


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
        # Take the backbone's mode (eval after from_pretrained) instead of nn.Module's default, train:
        # encode() restores the mode it found, and a train-mode wrapper would switch dropout on after it.
        self.train(bool(getattr(backbone, "training", True)))

    # ---------------------------------------------------------------- construction / saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *, template: str | None = None,
                        pooling: str | None = None, max_length: int | None = None,
                        trust_remote_code: bool = False, dtype: Any = None,
                        device: str | torch.device | None = None, warn_untrained: bool = True) -> "RelationEncoder":
        """Load a RelBERT model saved by relbert-ds or the public relbert code, or a plain backbone.

        Args:
            name_or_path: a model folder, a hub id or a backbone name. ``None`` loads the bundled
                backbone (all-MiniLM-L6-v2, untrained for relations) and warns.
            template, pooling, max_length: override what the model's ``relbert_config`` says.
                Without one the defaults are template ``d`` and ``average_no_mask`` (the released
                RelBERT models' choices) and max_length 64.
            device: ``None`` (default) leaves the model on the CPU, where the trainer and the
                evaluator place it themselves; ``"auto"`` picks CUDA when present, else the CPU;
                or ``"cpu"``, ``"cuda:1"``, a ``torch.device``.
            warn_untrained: emit an :class:`UntrainedModelWarning` when the model carries no
                ``relbert_config`` (a plain backbone). Callers that load a backbone on purpose
                (training starts from one) pass False.
        """
        if name_or_path is None:
            name_or_path = backbones.BUNDLED_BACKBONE
            if warn_untrained:
                warnings.warn(f"no model named: loading the bundled backbone {backbones.BUNDLED_BACKBONE}, which is "
                              f"not trained for relations (zero-shot vectors); pass a trained model folder or hub id "
                              f"to from_pretrained", UntrainedModelWarning, stacklevel=2)
                warn_untrained = False  # one warning for one cause
        target = resolve_device(device)
        resolved, config, tokenizer, settings = cls.check_loadable(
            name_or_path, template=template, pooling=pooling, max_length=max_length,
            trust_remote_code=trust_remote_code)
        if warn_untrained and not read_relbert_config(config):
            warnings.warn(f"{name_or_path} has no relbert_config in its config.json: it is a plain backbone, not "
                          f"trained for relations, so its vectors are zero-shot; pass a model trained with "
                          f"relbert-ds or relbert (or warn_untrained=False when that is intended)",
                          UntrainedModelWarning, stacklevel=2)
        backbone = backbones.load_backbone(resolved, config=config, trust_remote_code=trust_remote_code, dtype=dtype)
        encoder = cls(backbone, tokenizer, name=name_or_path, **settings)
        return encoder.to(target) if target is not None else encoder

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

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        relbert_compatible: bool = True) -> None:
        """Write a Hugging Face folder: safetensors weights, tokenizer, config.json with relbert_config.

        ``state_dict`` lets the trainer pass weights consolidated from ZeRO-3 partitions.
        ``relbert_compatible`` (default True) also writes the same tensors as ``pytorch_model.bin``
        (``pytorch_model-*.bin`` + index when the safetensors are sharded): the public relbert
        2.0.2 pins transformers 4.21, which cannot read safetensors. It doubles the weights on
        disk; pass False to write safetensors only. transformers and relbert-ds keep reading the
        safetensors file when both are there.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.config.update({RELBERT_CONFIG_KEY: self.relbert_config()})
        self.backbone.save_pretrained(str(directory), state_dict=state_dict)
        if state_dict is not None:
            _record_weights_dtype(directory / "config.json", state_dict)
        self.tokenizer.save_pretrained(str(directory))
        if relbert_compatible:
            write_torch_weights(directory)

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

    def truncation_warning(self, pairs: Sequence[Pair], what: str) -> Optional[str]:
        """One line saying how many distinct prompts of ``pairs`` exceed ``max_length`` tokens (and so
        are cut), with the longest; None when none does. ``what`` names the pairs ("training pairs")."""
        unique = list(dict.fromkeys(tuple(p) for p in pairs))
        if not unique:
            return None
        lengths = [len(x) for x in self.tokenizer(self.prompts(unique), truncation=False)["input_ids"]]
        cut = [i for i, n in enumerate(lengths) if n > self.max_length]
        if not cut:
            return None
        longest = max(cut, key=lengths.__getitem__)
        head, tail = (w if len(w) <= 40 else w[:37] + "..." for w in unique[longest])
        return (f"{len(cut)} of {len(unique)} {what} have prompts longer than max_length {self.max_length} tokens and "
                f"are truncated (the longest, ({head!r}, {tail!r}), has {lengths[longest]}); raise --max_length to "
                f"keep them whole, or fix those pairs in the data")

    def tokenize(self, pairs: Sequence[Pair], device: torch.device | None = None,
                 tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """Padded ``input_ids``/``attention_mask`` for ``pairs`` on ``device`` (default: the model's).
        ``tokenizer``: a copy of :attr:`tokenizer` for another thread (one is not safe to share)."""
        batch = (tokenizer or self.tokenizer)(self.prompts(pairs), truncation=True, max_length=self.max_length,
                                              padding=True, return_tensors="pt", return_token_type_ids=False)
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
        """(B, L) tokens -> (B, H) relation vectors (fp32 for a 16-bit or fp32 backbone: see ``pool``)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, input_ids, attention_mask, self.pooling, self.mask_token_id)

    def embed(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """Tokenize and forward ``pairs`` in one batch (autograd as the caller's mode allows).

        Outside autograd (encoding, evaluation, validation) a non-finite vector is a ModelError: a
        nan vector would otherwise score as the lowest cosine everywhere and turn into a silently
        wrong accuracy.
        """
        vectors = self(**self.tokenize(pairs))
        if not torch.is_grad_enabled():
            bad = ~torch.isfinite(vectors).all(dim=1)
            if bool(bad.any()):
                first = pairs[int(bad.nonzero()[0])]
                raise ModelError(f"{self.name} gives non-finite relation vectors (nan or inf) for {int(bad.sum())} of "
                                 f"{len(pairs)} pairs in a batch, e.g. {tuple(first)}; fix: its weights hold nan or "
                                 f"inf values (from a training run that diverged?): use an earlier checkpoint or "
                                 f"export")
        return vectors

    def encode(self, pairs: PairOrPairs, batch_size: int = 64, as_tensor: bool = False,
               show_progress: bool = False) -> np.ndarray | torch.Tensor:
        """Relation vectors as float32: one pair ``("paris", "france")`` gives a 1-D vector (H,);
        many pairs give one row per input pair (n, H), in input order.

        Identical pairs are encoded once; prompts are batched by token length (longest first,
        so that running out of memory happens on the first batch, not the last).
        """
        if is_single_pair(pairs):
            return self.encode([pairs], batch_size=batch_size, as_tensor=as_tensor, show_progress=show_progress)[0]
        pairs = validate_pairs(pairs)
        # The evaluator's batch plan (relbert_ds.model.batching): the same batches (and padding) as a sharded
        # encoding, so encode() and relbert-ds-evaluate give bit-identical vectors.
        plan = plan_batches(pairs, self.prompt_lengths, batch_size)
        batches = plan.batches
        vectors = torch.zeros(len(plan.unique), self.hidden_size, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                if show_progress:
                    from tqdm.auto import tqdm
                    batches = tqdm(batches, desc="encode", unit="batch")
                for idx in batches:
                    vectors[list(idx)] = self.embed([plan.unique[i] for i in idx]).float().cpu()
        finally:
            self.train(was_training)
        out = plan.rows().take(vectors, pairs)
        return out if as_tensor else out.numpy()

    def similarity(self, a: PairOrPairs, b: PairOrPairs, batch_size: int = 64) -> float | np.ndarray:
        """Cosine similarity of the relation vectors of pair(s) ``a`` and pair(s) ``b`` (float64).

        The shape follows the inputs: one pair and one pair give a float; one pair and n pairs
        (either side) a 1-D array (n,); n pairs and m pairs the matrix (n, m) (what
        sentence-transformers' ``util.cos_sim`` gives, as numpy). Both sides are encoded in one call;
        identical pairs get identical scores.
        """
        a_single, b_single = is_single_pair(a), is_single_pair(b)
        a_pairs = validate_pairs([a] if a_single else a)
        b_pairs = validate_pairs([b] if b_single else b)
        vectors = self.encode(a_pairs + b_pairs, batch_size=batch_size)
        scores = cosine(vectors[:len(a_pairs)], vectors[len(a_pairs):])
        if a_single and b_single:
            return float(scores[0, 0])
        if a_single or b_single:
            return scores[0] if a_single else scores[:, 0]
        return scores

    def analogy(self, stem: Sequence[str], choices: Iterable[Sequence[str]],
                batch_size: int = 64) -> list[RankedChoice]:
        """Rank ``choices`` by the cosine of their relation vector with the stem's, best first.

        Returns every choice as ``RankedChoice(pair, score, index)`` (``index``: its position in
        ``choices``). Equal scores keep the input order, so the first entry is the evaluator's
        prediction for the same multiple-choice question.
        """
        if not is_single_pair(stem):
            raise ConfigError(f"the analogy stem {stem!r} is not one (head, tail) pair; fix: pass e.g. "
                              f"('word', 'language')")
        choices = validate_pairs(choices)
        if not choices:
            raise ConfigError("analogy() got no choices; fix: pass at least one (head, tail) pair to rank")
        scores = np.atleast_1d(self.similarity(stem, choices, batch_size=batch_size))
        order = np.argsort(-scores, kind="stable")
        return [RankedChoice(choices[i], float(scores[i]), int(i)) for i in order]


def _record_weights_dtype(config_file: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Make config.json's ``dtype`` name the dtype of the weights written, not the in-memory model's.

    transformers records the model's dtype (bf16 after bf16 training) even when ``state_dict``
    holds fp32 master weights, and transformers 5 loads a model in the dtype config.json names.
    """
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if len(dtypes) != 1:
        return
    name = str(dtypes.pop()).removeprefix("torch.")
    config = json.loads(config_file.read_text())
    if config.get("dtype") == name and config.get("torch_dtype", name) == name:
        return
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_torch_weights(directory: str | Path) -> list[Path]:
    """Copy the safetensors weights of ``directory`` into ``pytorch_model.bin`` (torch.save, same tensors).

    Read back from the safetensors file(s) just written rather than from memory, so the two
    files hold the same tensors whatever transformers dropped or renamed on saving. Sharded
    weights become ``pytorch_model-*.bin`` shards with a ``pytorch_model.bin.index.json``,
    the layout transformers 4.21 reads. Returns the files written.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    written: list[Path] = []
    index = directory / backbones.SAFETENSORS_INDEX
    if index.is_file():
        meta = json.loads(index.read_text())
        renamed = {name: _bin_shard_name(name) for name in dict.fromkeys(meta["weight_map"].values())}
        for source, target in renamed.items():
            torch.save(load_file(str(directory / source)), directory / target)
            written.append(directory / target)
        meta["weight_map"] = {key: renamed[name] for key, name in meta["weight_map"].items()}
        (directory / backbones.TORCH_INDEX).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        written.append(directory / backbones.TORCH_INDEX)
    else:
        torch.save(load_file(str(directory / backbones.SAFETENSORS_WEIGHTS)), directory / backbones.TORCH_WEIGHTS)
        written.append(directory / backbones.TORCH_WEIGHTS)
    return written


def _bin_shard_name(safetensors_name: str) -> str:
    """``model-00001-of-00002.safetensors`` -> ``pytorch_model-00001-of-00002.bin``."""
    stem = safetensors_name[:-len(".safetensors")] if safetensors_name.endswith(".safetensors") else safetensors_name
    return "pytorch_" + stem + ".bin"


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
