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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, get_args, get_origin, get_type_hints

from relbert_ds.data.training_sources import WEIGHT_MODES
from relbert_ds.errors import ConfigError

# Defaults and choices that belong to a component are read from it (one source each).
from relbert_ds.model.encoder import DEFAULT_MAX_LENGTH
from relbert_ds.model.pooling import DEFAULT_POOLING, POOLING_MODES
from relbert_ds.model.prompts import DEFAULT_TEMPLATE
from relbert_ds.training.losses import LOSS_NAMES

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
    template: str = _f(DEFAULT_TEMPLATE, "prompt template id a-e or a text with <subj>, <obj> and optionally <mask>")
    pooling: str = _f(DEFAULT_POOLING, " | ".join(POOLING_MODES) + " (last: decoder-only LMs)")
    max_length: int = _f(DEFAULT_MAX_LENGTH, "prompts are truncated to this many tokens")
    dropout: Optional[float] = _f(None, "override every dropout probability of the backbone (0 makes runs on "
                                        "different world sizes identical; default: the backbone's own)")
    trust_remote_code: bool = _f(False, "allow model code from the hub (off unless you trust the repository)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (large backbones)")


@dataclass
class DataConfig:
    """Training data and the relation-aware batch plan (the global batch is world-size invariant)."""

    train_data: list = _f(["semeval2012"], "relational-similarity data, one or more sources: bundled name, local "
                                           ".jsonl/folder, or hub id (relation ids are kept apart per source)",
                          nargs="+")
    train_weights: Optional[list] = _f(None, "sampling weight per --train_data source (> 0; default 1 each): "
                                             "expected appearances of each of its relations per epoch (2: twice, "
                                             "0.5: every other epoch), or its share with --train_weights_mode share",
                                       item_type=float)
    train_weights_mode: str = _f("relations", "what a --train_weights weight scales: relations (each relation's "
                                              "appearances per epoch, whatever the source's size) or share (the "
                                              "source's share of the steps: 1 1 gives two sources half each)")
    train_split: str = _f("train", "split of train_data to train on")
    relations_per_step: Optional[int] = _f(None, "relations per optimizer step over ALL ranks (the global batch, "
                                                 "DeepSpeed's train_batch_size; default: the DS config's, else 16)")
    relations_per_rank: Optional[int] = _f(None, "DEPRECATED: relations per rank per step (the global batch then "
                                                 "grows with the world size); use --relations_per_step")
    shard_by: str = _f("prompt", "how a step is divided over ranks: prompt (even prompt counts, any world size) or "
                                 "relation (whole relation groups per rank)")
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
    epochs: Optional[int] = _f(None, "passes over the relations (default 10, or as many as --max_steps needs)")
    max_steps: Optional[int] = _f(None, "optimizer steps of the run (a recipe at scale: an epoch is then only "
                                        "a few steps); with --epochs too, the earlier end wins")
    eval_every_steps: int = _f(0, "validate (and select the best model) every N optimizer steps (0: at the end "
                                  "of each epoch); the end of the run is always validated")
    loss: str = _f("nce", " | ".join(LOSS_NAMES))
    temperature: float = _f(0.05, "temperature of nce/iloob")
    margin: float = _f(1.0, "margin of the triplet loss (L2 distance of mean-pooled vectors)")
    classification_loss: bool = _f(False, "add RelBERT 2021's classification loss on [u; v; |u-v|]")
    lr: Optional[float] = _f(None, "AdamW learning rate when the DS config has no optimizer (default 2e-5)")
    weight_decay: Optional[float] = _f(None, "AdamW weight decay when the DS config has no optimizer (default 0)")
    warmup_steps: Optional[int] = _f(None, "linear warm-up steps when the DS config has no scheduler (default 10)")
    lr_schedule: Optional[str] = _f(None, "after warm-up: constant or linear decay to 0 (default constant)")
    save_every_steps: int = _f(0, "also checkpoint every N optimizer steps (0: at each validation only)")
    max_nonfinite_steps: int = _f(3, "stop the run (exit 3, no export) after N optimizer steps in a row whose loss "
                                     "is not finite or whose update DeepSpeed skipped for a non-finite gradient; "
                                     "fp16 loss-scale overflows with a finite loss are counted, not stopped on; "
                                     "0: never stop")
    keep_last: int = _f(2, "checkpoints to keep (the newest N)")
    resume: Optional[str] = _f(None, "continue a run: 'latest', a checkpoint folder, or 'auto' (latest if there "
                                     "is one, else start: for requeued cluster jobs)")
    overwrite: bool = _f(False, "replace an existing run in output_dir")
    log_every_steps: int = _f(1, "TensorBoard/progress interval in optimizer steps")
    tensorboard: bool = _f(True, "write TensorBoard events to output_dir/tensorboard (rank 0)")
    peak_tflops: Optional[float] = _f(None, "per-device peak for MFU (default: measured matmul peak on CPU, "
                                            "known peaks on GPUs)")
    threads: Optional[int] = _f(None, "torch threads per rank on CPU (default: cores / local ranks)")
    export_best: bool = _f(True, "export the best validated model to output_dir/best_model")
    relbert_compatible: bool = _f(True, "exports also hold pytorch_model.bin, which the public relbert package "
                                        "(transformers 4.21) needs")
    push_to_hub: Optional[str] = _f(None, "at the end, upload output_dir/best_model (output_dir/model "
                                          "without one) to this hub repository (rank 0; needs a token)")
    dry_run: bool = _f(False, "print the batch plan (per-rank prompt counts, steps) and exit: no model, no ranks")
    world_size: Optional[int] = _f(None, "with --dry_run: the world size to plan for (default: this job's)")


@dataclass
class ValidationConfig:
    """Validation and model selection (uses the evaluator's code)."""

    metric: str = _f("analogy", "model selection: analogy (mean accuracy on the analogy validation sets), "
                                "loss (validation loss), none")
    analogy: list = _f(["semeval2012", "sat", "u2", "u4", "google", "bats"],
                       "analogy validation sets (semeval2012 = the 79 questions built from its validation split)")
    validation_split: str = _f("validation", "split of train_data for the validation loss and projector")
    early_stop_patience: int = _f(0, "stop after N validations without improvement (0: never)")
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
        """The config from :meth:`to_dict`'s form (a run's ``config.json``); unknown keys are ignored."""
        kwargs: dict[str, Any] = {"deepspeed_config": data.get("deepspeed_config")}
        for name, klass in CONFIG_CLASSES.items():
            known = {f.name for f in dataclasses.fields(klass)}
            values = {k: v for k, v in (data.get(name) or {}).items() if k in known}
            if name == "data" and isinstance(values.get("train_data"), str):  # config.json of one source
                values["train_data"] = [values["train_data"]]
            kwargs[name] = klass(**values)
        return cls(**kwargs)

    def validate(self) -> "RunConfig":
        """Check values that need no files, models or ranks, with the components' own checks;
        raise ConfigError naming the fix."""
        from relbert_ds.model.encoder import _check_max_length, _check_pooling
        from relbert_ds.model.prompts import resolve_template
        from relbert_ds.training.losses import check_loss_options
        from relbert_ds.training.sampler import check_knobs

        m, d, t, v = self.model, self.data, self.train, self.validation
        _check_pooling(m.pooling, resolve_template(m.template))
        _check_max_length(m.max_length)
        check_loss_options(t.loss, t.temperature, t.margin)
        check_knobs(relations_per_step=d.relations_per_step, positives_per_relation=d.positives_per_relation,
                    negatives_per_relation=d.negatives_per_relation, seed=d.seed, tail=d.tail, shard_by=d.shard_by)
        _choice("--metric", v.metric, SELECTION_METRICS)
        if t.lr_schedule is not None:
            _choice("--lr_schedule", t.lr_schedule, LR_SCHEDULES)
        if not d.train_data:
            raise ConfigError("--train_data names no source; fix: name one, e.g. --train_data semeval2012")
        if d.train_weights is not None:
            if len(d.train_weights) != len(d.train_data):
                raise ConfigError(f"--train_weights has {len(d.train_weights)} value(s) for {len(d.train_data)} "
                                  f"--train_data source(s); fix: give one weight per source")
            bad = [w for w in d.train_weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
            if bad:
                raise ConfigError(f"--train_weights {bad[0]!r} is not a positive number; fix: use weights > 0")
        _choice("--train_weights_mode", d.train_weights_mode, WEIGHT_MODES)
        if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"--dropout is {m.dropout}; fix: use a probability in [0, 1)")
        for name, value, low in (("--keep_last", t.keep_last, 1), ("--log_every_steps", t.log_every_steps, 1),
                                 ("--max_nonfinite_steps", t.max_nonfinite_steps, 0),
                                 ("--save_every_steps", t.save_every_steps, 0),
                                 ("--eval_every_steps", t.eval_every_steps, 0), ("--batch_size", v.batch_size, 1),
                                 ("--early_stop_patience", v.early_stop_patience, 0)):
            if value < low:
                raise ConfigError(f"{name} is {value}; fix: use a value >= {low}")
        for name, value, low in (("--relations_per_rank", d.relations_per_rank, 1), ("--max_steps", t.max_steps, 1),
                                 ("--epochs", t.epochs, 1), ("--warmup_steps", t.warmup_steps, 0),
                                 ("--threads", t.threads, 1), ("--world_size", t.world_size, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{name} is {value}; fix: use a value >= {low}")
        if t.lr is not None and t.lr <= 0:
            raise ConfigError(f"--lr is {t.lr}; fix: use a positive learning rate such as 2e-5")
        if t.world_size is not None and not t.dry_run:
            raise ConfigError("--world_size only plans a --dry_run (a real job's world size comes from its "
                              "launcher); fix: add --dry_run or drop --world_size")
        return self


def _choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(choices)}; fix: pick one of them")


# --------------------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, printed once by the CLI shell on rank 0)
    instead of printing usage on every rank and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; fix: see {self.prog} --help")


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
            group.add_argument(f"--{f.name}", nargs=f.metadata.get("nargs", "*"), default=default, help=help_text,
                               type=f.metadata.get("item_type", str))
        else:
            group.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    values = vars(args)
    parts = {name: klass(**{f.name: values[f.name] for f in dataclasses.fields(klass)})
             for name, klass in CONFIG_CLASSES.items()}
    return RunConfig(**parts, deepspeed_config=values.get("deepspeed_config"))


def build_train_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="relbert-ds-train", description="Train RelBERT relation embeddings with DeepSpeed "
        "(launch with deepspeed, torchrun, mpirun, srun or plain python).")
    parser.add_argument("--deepspeed_config", default=None,
                        help="DeepSpeed JSON (ZeRO stage, precision, batch sizes, optional optimizer/scheduler; "
                             "Hugging Face-style \"auto\" values are filled); default: the embedded ZeRO-2 config, "
                             "same as ds_configs/zero2.json")
    # `--deepspeed` alone is DeepSpeed's own flag (ignored); `--deepspeed PATH` is the Hugging Face spelling.
    parser.add_argument("--deepspeed", nargs="?", const=True, default=None, metavar="PATH",
                        help="alias of --deepspeed_config (Hugging Face's spelling)")
    parser.add_argument("--config", default=None, metavar="RUN.json|RUN.yaml",
                        help="replay a run: its config.json (or a YAML/JSON file of the same groups); options "
                             "given on the command line win")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's and transformers' INFO logs")
    for name, klass in CONFIG_CLASSES.items():
        add_dataclass_arguments(parser, klass, f"{name} options")
    return parser


class TrainCommand(NamedTuple):
    """A parsed ``relbert-ds-train`` command line."""

    run: RunConfig
    verbose: bool


def parse_train_command(argv: Optional[Sequence[str]] = None) -> TrainCommand:
    """The run config of a ``relbert-ds-train`` command line (``--config`` file first, then the
    options given), validated. ConfigError for anything wrong."""
    parser = build_train_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**_flat_config(read_config_file(args.config)))
        args = parser.parse_args(argv)
    if isinstance(args.deepspeed, str):
        if args.deepspeed_config is not None and args.deepspeed_config != args.deepspeed:
            raise ConfigError(f"--deepspeed {args.deepspeed} and --deepspeed_config {args.deepspeed_config} name "
                              f"two configs; fix: give one of them")
        args.deepspeed_config = args.deepspeed
    return TrainCommand(run_config_from_args(args).validate(), args.verbose)


def read_config_file(path: str) -> dict[str, Any]:
    """A run's ``config.json`` or a YAML/JSON file with the same groups (model, data, train,
    validation, deepspeed_config)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path} does not exist; fix: pass a run's config.json (output_dir/config.json)")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"--config {path} cannot be parsed ({str(exc).splitlines()[0]}); fix: correct the "
                          f"file") from None
    if not isinstance(data, dict) or not any(k in data for k in CONFIG_CLASSES):
        raise ConfigError(f"--config {path} holds no run config (no {', '.join(CONFIG_CLASSES)} groups); fix: "
                          f"pass a run's config.json")
    return data


def _flat_config(data: dict[str, Any]) -> dict[str, Any]:
    """Group dicts -> argparse destinations (field names are unique across groups)."""
    run = RunConfig.from_dict(data)
    flat: dict[str, Any] = {"deepspeed_config": run.deepspeed_config}
    for name in CONFIG_CLASSES:
        flat.update(dataclasses.asdict(getattr(run, name)))
    # A replayed run starts afresh unless told: resuming or overwriting is the caller's choice.
    flat.update(resume=None, overwrite=False, dry_run=False, world_size=None)
    return flat


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
