"""One config object per concern, each field documented; the command lines are built from them.

DeepSpeed's JSON stays the source of truth for what is DeepSpeed's (ZeRO stage, precision,
batch sizes, optimizer and scheduler when given there): these dataclasses do not repeat it.
Every run directory gets the resolved configs (``config.json``) and DeepSpeed JSON
(``ds_config.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, get_args, get_origin, get_type_hints

from relbert_ds.errors import ConfigError

LOSSES = ("nce", "iloob", "triplet")
LR_SCHEDULES = ("constant", "linear")
SELECTION_METRICS = ("analogy", "loss", "none")


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """The backbone and how a word pair becomes a vector."""

    model: str = _f("all-MiniLM-L6-v2", "backbone: hub id, local folder, or all-MiniLM-L6-v2 (bundled, offline)")
    template: str = _f("d", "prompt template id a-e or a text with <subj>, <obj> and optionally <mask>")
    pooling: str = _f("average_no_mask", "average_no_mask | average | mask | last (decoder-only LMs)")
    max_length: int = _f(64, "prompts are truncated to this many tokens")
    trust_remote_code: bool = _f(False, "allow model code from the hub (off unless you trust the repository)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (large backbones)")


@dataclass
class DataConfig:
    """Training data and the relation-aware batch plan."""

    train_data: str = _f("semeval2012", "relational-similarity data: bundled name, local .jsonl/folder, or hub id")
    train_split: str = _f("train", "split of train_data to train on")
    relations_per_rank: Optional[int] = _f(None, "relation groups per rank per micro step (DeepSpeed's micro "
                                                 "batch; default: the DS config's train_micro_batch_size_per_gpu, else 8)")
    positives_per_relation: int = _f(8, "positive pairs per relation group (at least 2)")
    negatives_per_relation: int = _f(8, "up to this many of the relation's own negative pairs per group")
    tail: str = _f("fill", "uneven last step of an epoch: fill (complete it with other relations) or drop")
    parent_grouping: bool = _f(False, "put relations of the same parent category into the same global batch "
                                      "(sibling relations as hard negatives)")
    seed: int = _f(0, "seed of the batch plan, initialisation and dropout")


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and logging (DeepSpeed settings live in its JSON)."""

    output_dir: str = _f("runs/default", "run directory: configs, checkpoints, tensorboard, exported models")
    epochs: int = _f(10, "passes over the relations")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (tests, benchmarks)")
    loss: str = _f("nce", "nce | iloob | triplet")
    temperature: float = _f(0.05, "temperature of nce/iloob")
    margin: float = _f(1.0, "margin of the triplet loss (L2 distance of mean-pooled vectors)")
    classification_loss: bool = _f(False, "add RelBERT 2021's classification loss on [u; v; |u-v|]")
    lr: Optional[float] = _f(None, "AdamW learning rate when the DS config has no optimizer (default 2e-5)")
    weight_decay: Optional[float] = _f(None, "AdamW weight decay when the DS config has no optimizer (default 0)")
    warmup_steps: Optional[int] = _f(None, "linear warm-up steps when the DS config has no scheduler (default 10)")
    lr_schedule: Optional[str] = _f(None, "after warm-up: constant or linear decay to 0 (default constant)")
    save_every_steps: int = _f(0, "also checkpoint every N optimizer steps (0: at the end of each epoch only)")
    keep_last: int = _f(2, "checkpoints to keep (the newest N)")
    resume: Optional[str] = _f(None, "continue a run: 'latest', a checkpoint folder, or 'auto' (latest if there "
                                     "is one, else start: for requeued cluster jobs)")
    overwrite: bool = _f(False, "replace an existing run in output_dir")
    log_every_steps: int = _f(1, "TensorBoard/progress interval in optimizer steps")
    tensorboard: bool = _f(True, "write TensorBoard events to output_dir/tensorboard (rank 0)")
    peak_tflops: Optional[float] = _f(None, "per-device peak for MFU (default: measured matmul peak on CPU, "
                                            "known peaks on GPUs)")
    threads: Optional[int] = _f(None, "torch threads per rank on CPU (default: cores / local ranks)")
    export_best: bool = _f(True, "export the best epoch's model to output_dir/best_model")


@dataclass
class ValidationConfig:
    """Per-epoch validation and model selection (uses the evaluator's code)."""

    metric: str = _f("analogy", "model selection: analogy (mean accuracy on the analogy validation sets), "
                                "loss (validation loss), none")
    analogy: list = _f(["semeval2012", "sat", "u2", "u4", "google", "bats"],
                       "analogy validation sets (semeval2012 = the 79 questions built from its validation split)")
    validation_split: str = _f("validation", "split of train_data for the validation loss and projector")
    early_stop_patience: int = _f(0, "stop after N epochs without improvement (0: never)")
    batch_size: int = _f(64, "prompts per forward when validating")
    projector: bool = _f(True, "write validation relation embeddings to TensorBoard's projector")


CONFIG_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "validation": ValidationConfig}


@dataclass
class RunConfig:
    """Everything a training run was started with (dumped as output_dir/config.json)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    deepspeed_config: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        kwargs: dict[str, Any] = {"deepspeed_config": data.get("deepspeed_config")}
        for name, klass in CONFIG_CLASSES.items():
            known = {f.name for f in dataclasses.fields(klass)}
            kwargs[name] = klass(**{k: v for k, v in data.get(name, {}).items() if k in known})
        return cls(**kwargs)

    def validate(self) -> "RunConfig":
        """Check values that need no files, models or ranks; raise ConfigError naming the fix."""
        m, d, t, v = self.model, self.data, self.train, self.validation
        from relbert_ds.pooling import POOLING_MODES
        from relbert_ds.prompts import resolve_template

        resolve_template(m.template)
        _choice("--pooling", m.pooling, POOLING_MODES)
        _choice("--loss", t.loss, LOSSES)
        _choice("--tail", d.tail, ("fill", "drop"))
        _choice("--metric", v.metric, SELECTION_METRICS)
        if t.lr_schedule is not None:
            _choice("--lr_schedule", t.lr_schedule, LR_SCHEDULES)
        for name, value, low in (("--max_length", m.max_length, 8), ("--epochs", t.epochs, 1),
                                 ("--positives_per_relation", d.positives_per_relation, 2),
                                 ("--negatives_per_relation", d.negatives_per_relation, 0),
                                 ("--keep_last", t.keep_last, 1), ("--log_every_steps", t.log_every_steps, 1),
                                 ("--save_every_steps", t.save_every_steps, 0), ("--batch_size", v.batch_size, 1),
                                 ("--early_stop_patience", v.early_stop_patience, 0)):
            if value < low:
                raise ConfigError(f"{name} is {value}; fix: use a value >= {low}")
        for name, value in (("--relations_per_rank", d.relations_per_rank), ("--max_steps", t.max_steps),
                            ("--warmup_steps", t.warmup_steps), ("--threads", t.threads)):
            if value is not None and value < (0 if name == "--warmup_steps" else 1):
                raise ConfigError(f"{name} is {value}; fix: use a positive value")
        if t.temperature <= 0 or t.margin <= 0:
            raise ConfigError(f"--temperature {t.temperature} / --margin {t.margin}: both must be > 0; fix: use positive "
                              f"values (defaults 0.05 and 1.0)")
        if t.lr is not None and t.lr <= 0:
            raise ConfigError(f"--lr is {t.lr}; fix: use a positive learning rate such as 2e-5")
        return self


def _choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(choices)}; fix: pick one of them")


# --------------------------------------------------------------------------- command line

def add_dataclass_arguments(parser: argparse.ArgumentParser, klass: type, title: str) -> None:
    """One option per field, ``--<field>``, with the field's help and default."""
    group = parser.add_argument_group(title, klass.__doc__)
    hints = get_type_hints(klass)
    for f in dataclasses.fields(klass):
        kind = hints[f.name]
        if get_origin(kind) is Optional or type(None) in get_args(kind):
            kind = next(a for a in get_args(kind) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind is list or get_origin(kind) is list:
            group.add_argument(f"--{f.name}", nargs="*", default=default, help=help_text)
        else:
            group.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    values = vars(args)
    parts = {name: klass(**{f.name: values[f.name] for f in dataclasses.fields(klass)})
             for name, klass in CONFIG_CLASSES.items()}
    return RunConfig(**parts, deepspeed_config=values.get("deepspeed_config"))


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train RelBERT relation embeddings with DeepSpeed "
        "(launch with deepspeed, torchrun, mpirun, srun or plain python).")
    parser.add_argument("--deepspeed_config", default=None,
                        help="DeepSpeed JSON (ZeRO stage, precision, batch sizes, optional optimizer/scheduler); "
                             "default: the embedded ZeRO-2 config, same as ds_configs/zero2.json")
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's own flag
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's and transformers' INFO logs")
    for name, klass in CONFIG_CLASSES.items():
        add_dataclass_arguments(parser, klass, f"{name} options")
    return parser


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
