"""``"auto"`` values of a DeepSpeed JSON written for the Hugging Face Trainer, filled the way the
Hugging Face integration fills them, from relbert-ds's options and the backbone's hidden size.

A config such as the Hugging Face docs' ``ds_config_zero2.json`` / ``ds_config_zero3.json``
leaves values to the trainer with ``"auto"``. The Hugging Face Trainer fills them from its
``TrainingArguments`` and the model (``HfTrainerDeepSpeedConfig.trainer_config_process`` and
``trainer_config_finalize``); relbert-ds fills the same keys from its own options:

=============================================  ==============================================
key                                            value
=============================================  ==============================================
``optimizer.params.lr``                        ``--lr`` (relbert-ds default 2e-5; HF: 5e-5)
``optimizer.params.betas``                     ``[0.9, 0.999]`` (relbert-ds's AdamW, HF's too)
``optimizer.params.eps``                       ``1e-8``
``optimizer.params.weight_decay``              ``--weight_decay`` (default 0)
``scheduler.params.warmup_min_lr``             ``0``
``scheduler.params.warmup_max_lr``             ``--lr``
``scheduler.params.warmup_num_steps``          ``max(1, --warmup_steps)`` (default 10;
                                               DeepSpeed refuses 0)
``scheduler.params.total_num_steps``           the run's optimizer steps (``--max_steps``, or
                                               epochs x steps per epoch)
``gradient_clipping``                          ``max_grad_norm`` (1.0, as in HF and the
                                               embedded config)
``zero_optimization.reduce_bucket_size``       ``hidden * hidden``
``zero_optimization.stage3_prefetch_bucket_size``  ``int(0.9 * hidden * hidden)``
``zero_optimization.stage3_param_persistence_threshold``  ``10 * hidden``
=============================================  ==============================================

Scheduler parameters are filled for the types whose parameters they are (DeepSpeed builds the
scheduler): ``WarmupLR`` (``warmup_min_lr``, ``warmup_max_lr``, ``warmup_num_steps``),
``WarmupDecayLR`` (those and ``total_num_steps``) and ``WarmupCosineLR`` (``warmup_num_steps``,
``total_num_steps``; it takes its peak from the optimizer's lr).

The batch triad (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``) and precision (``bf16.enabled``, ``fp16.enabled``) may be
``"auto"`` too; they are resolved by :mod:`relbert_ds.training.engine` (``resolve_batch``,
``resolve_precision``) and left alone here. Any other ``"auto"`` is a :class:`ConfigError`.

Two differences from the Hugging Face code, so that the run's ``ds_config.json`` holds no
``"auto"`` and says what ran: the ``stage3_*`` sizes are filled at every ZeRO stage (HF fills
them only under ZeRO-3; DeepSpeed reads them only under ZeRO-3, so this changes nothing else),
and an ``"auto"`` nobody fills is refused with one line. DeepSpeed itself would silently replace
it by its default in the sections its config models parse (they drop ``"auto"`` values) and fail
later, deep inside, in the others (optimizer and scheduler parameters).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from relbert_ds.errors import ConfigError

# Resolved by relbert_ds.training.engine (resolve_batch / resolve_precision), not here.
ENGINE_AUTO_KEYS = frozenset({"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                              "bf16.enabled", "fp16.enabled"})

# The scheduler parameters an "auto" may stand for, per DeepSpeed scheduler type.
WARMUP_SCHEDULER_AUTO_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps"),
}

Fill = Callable[[str, Any, str], None]  # (dotted path, value, why) -> replaces the value if it is "auto"

HIDDEN_SIZE_KEYS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold")


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _auto_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every "auto" value in a JSON tree (list items as ``key[i]``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _auto_paths(value, f"{prefix}[{i}]")
    elif is_auto(node):
        yield prefix


def _section(ds: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The nested object at ``keys`` (an empty dict when absent or not an object)."""
    node: Any = ds
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def auto_options(ds: dict[str, Any]) -> set[str]:
    """The relbert-ds options that the JSON's ``"auto"`` values take (``--lr``, ``--weight_decay``,
    ``--warmup_steps``).

    For the engine's one-place rule: an option given next to an optimizer/scheduler section is
    refused, except when the section says ``"auto"`` for it (then the option fills it, as in HF).
    Call it before :func:`resolve_hf_auto`, which replaces the ``"auto"`` values.
    """
    opt, sched = _section(ds, "optimizer", "params"), _section(ds, "scheduler", "params")
    takes = set()
    if is_auto(opt.get("lr")) or is_auto(sched.get("warmup_max_lr")):
        takes.add("--lr")
    if is_auto(opt.get("weight_decay")):
        takes.add("--weight_decay")
    if is_auto(sched.get("warmup_num_steps")):
        takes.add("--warmup_steps")
    return takes


def resolve_hf_auto(ds: dict[str, Any], source: str, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int, total_steps: int,
                    max_grad_norm: float = 1.0, hidden_size: Optional[int] = None) -> list[str]:
    """Replace, in place, every Hugging Face-style ``"auto"`` in ``ds`` (see the module docstring
    for the table); return one note per replacement for the start-up log.

    Precedence: an ``"auto"`` means "the trainer's value", so relbert-ds's option fills it, given
    or default: ``"lr": "auto"`` in the JSON's optimizer takes ``--lr`` (default 2e-5). An option
    given next to an optimizer/scheduler section with a *number* for it stays refused by the
    engine (one place for each value); :func:`auto_options` tells which options an ``"auto"``
    takes. The batch and precision ``"auto"`` keys (``ENGINE_AUTO_KEYS``) are left for the
    engine. ``hidden_size`` (the backbone's) is needed only for the ZeRO bucket sizes.

    Raises :class:`ConfigError` for an ``"auto"`` no one fills, or a bucket-size ``"auto"``
    without a hidden size.
    """
    notes: list[str] = []

    def fill(path: str, value: Any, why: str) -> None:
        *parents, key = path.split(".")
        node = _section(ds, *parents)
        if is_auto(node.get(key)):
            node[key] = value
            notes.append(f"{path}: auto -> {value} ({why})")

    fill("optimizer.params.lr", float(lr), "--lr")
    fill("optimizer.params.betas", [float(b) for b in betas], "AdamW betas")
    fill("optimizer.params.eps", float(eps), "AdamW eps")
    fill("optimizer.params.weight_decay", float(weight_decay), "--weight_decay")
    _fill_scheduler(ds, fill, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps)
    fill("gradient_clipping", float(max_grad_norm), "max_grad_norm")
    _fill_bucket_sizes(ds, source, fill, hidden_size)
    _refuse_unfilled(ds, source)
    return notes


def _fill_scheduler(ds: dict[str, Any], fill: Fill, *, lr: float, warmup_steps: int, total_steps: int) -> None:
    kind = _section(ds, "scheduler").get("type")
    takes = WARMUP_SCHEDULER_AUTO_PARAMS.get(kind, ())
    values = {"warmup_min_lr": (0.0, "HF's value"), "warmup_max_lr": (float(lr), "--lr"),
              # DeepSpeed >= 0.19.6 refuses 0 warm-up steps; HF fills max(1, warmup) for the same reason
              "warmup_num_steps": (max(1, int(warmup_steps)), "--warmup_steps"),
              "total_num_steps": (int(total_steps), "optimizer steps of this run")}
    for name in takes:
        value, why = values[name]
        fill(f"scheduler.params.{name}", value, why)


def _fill_bucket_sizes(ds: dict[str, Any], source: str, fill: Fill, hidden_size: Optional[int]) -> None:
    zero = _section(ds, "zero_optimization")
    wanted = [path for path in HIDDEN_SIZE_KEYS if is_auto(zero.get(path.split(".")[1]))]
    if not wanted:
        return
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
        verb = "is" if len(wanted) == 1 else "are"
        raise ConfigError(f"{source}: {', '.join(wanted)} {verb} \"auto\" but the backbone's hidden size is "
                          f"unknown ({hidden_size!r}); fix: set them to numbers (e.g. reduce_bucket_size 5e8)")
    h = hidden_size
    fill("zero_optimization.reduce_bucket_size", h * h, f"hidden size {h} squared")
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * h * h), f"0.9 x {h}^2")
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * h, f"10 x hidden size {h}")


def _refuse_unfilled(ds: dict[str, Any], source: str) -> None:
    left = [path for path in _auto_paths(ds) if path not in ENGINE_AUTO_KEYS]
    if not left:
        return
    path = left[0]
    kind = _section(ds, "scheduler").get("type")
    if path.startswith("scheduler.params.") and kind not in WARMUP_SCHEDULER_AUTO_PARAMS:
        hint = f"\"auto\" scheduler values are filled for {', '.join(WARMUP_SCHEDULER_AUTO_PARAMS)}, not {kind!r}"
    elif path.startswith("scheduler.params."):
        hint = f"{kind} takes \"auto\" only for {', '.join(WARMUP_SCHEDULER_AUTO_PARAMS[kind])}"
    else:
        hint = ("relbert-ds fills the \"auto\" values the Hugging Face Trainer fills "
                "(see relbert_ds/training/ds_auto.py)")
    more = ""
    if len(left) > 1:
        more = f" (and {len(left) - 1} more: {', '.join(left[1:4])}{', ...' if len(left) > 4 else ''})"
    raise ConfigError(f"{source}: {path} is \"auto\", which nothing fills{more}; {hint}; "
                      f"fix: set {path} to a value (or remove it)")


def hidden_size_of(model_config: Any) -> Optional[int]:
    """The hidden size the bucket-size ``"auto"`` values are computed from, looked up as the
    Hugging Face integration does: ``hidden_size``, else the largest of ``hidden_sizes``, else the
    same in a multimodal model's ``text_config``; None when the config has none of them."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        if config is None:
            continue
        if isinstance(getattr(config, "hidden_size", None), int):
            return config.hidden_size
        sizes = getattr(config, "hidden_sizes", None)
        if sizes:
            return max(sizes)
    return None
