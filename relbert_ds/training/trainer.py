"""The training loop: data -> relation-aware sampler -> encoder -> cross-device loss -> DeepSpeed
step -> monitor -> validation and model selection -> checkpoints -> export.

Every rank runs the same code and the same number of steps; collectives happen at the same
points on every rank (the forward under ZeRO-3, the loss's gathers, DeepSpeed's reductions,
validation's sharded encoding, checkpoint saves).

Public API, for the command line and for scripts (benchmarks use it too)::

    trainer = Trainer(run)
    trainer.prepare()             # ranks, data, engine, resume: every check before any heavy work
    record = trainer.train_step() # one optimizer step (all its micro steps); the step's metrics
    result = trainer.validate()   # the validation sets, as the evaluator computes them
    trainer.fit()                 # prepare + the whole run (validation, selection, checkpoints, export)

What a run has done so far is one object, :class:`TrainProgress`: it is what a checkpoint saves
and what a resume restores.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from relbert_ds import __version__
from relbert_ds.data.schemas import AnalogyDataset, RelationDataset
from relbert_ds.data.training_sources import load_train_data
from relbert_ds.errors import CheckpointError, DataError
from relbert_ds.evaluation import validation
from relbert_ds.model import backbones
from relbert_ds.model.encoder import RelationEncoder
from relbert_ds.parallel import collectives, distributed
from relbert_ds.training import checkpointing
from relbert_ds.training.config import RunConfig, write_json
from relbert_ds.training.engine import (
    ResolvedDeepSpeed,
    initialize_engine,
    load_ds_config,
    model_construction_context,
    resolve_batch,
    resolve_deepspeed_config,
)
from relbert_ds.training.losses import LossOutput, build_loss
from relbert_ds.training.monitor import (
    TrainingMonitor,
    device_peak_flops,
    matmul_parameters,
    model_flops_per_token,
    peak_memory_bytes,
)
from relbert_ds.training.run_directory import HistoryError, RunDirectory
from relbert_ds.training.sampler import LocalBatch, RelationAwareSampler

log = logging.getLogger("relbert_ds")

# Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing (the SLURM script requeues).
PREEMPTED_EXIT_CODE = 124


class RelationTrainingModule(torch.nn.Module):
    """What DeepSpeed wraps: the encoder and the loss (which may own parameters: the
    classification head). One forward through the encoder per step."""

    def __init__(self, encoder: RelationEncoder, loss: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, relation_ids: torch.Tensor,
                is_positive: torch.Tensor, parent_ids: torch.Tensor, pair_ids: torch.Tensor) -> LossOutput:
        embeddings = self.encoder(input_ids, attention_mask)
        return self.loss(embeddings, relation_ids, is_positive, parent_ids, pair_ids)


@dataclass
class TrainResult:
    """What a finished run produced (paths are on the shared file system)."""

    output_dir: str
    final_model: Optional[str]
    best_model: Optional[str]
    best_epoch: Optional[int]
    best_step: Optional[int]
    best_metric: Optional[float]
    optimizer_steps: int
    preempted: bool = False
    evaluations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainProgress:
    """What a run has done so far: saved in every checkpoint, restored on resume.

    ``epoch``/``step_in_epoch`` is the position of the NEXT optimizer step in the sampler's plan.
    ``best`` is the best validation so far (``epoch``, ``step``, ``metric``, ``score``);
    ``stale`` counts validations without improvement (early stopping); ``evaluations`` holds
    every validation result.
    """

    optimizer_steps: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "step": None, "metric": None, "score": None})
    stale: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, steps_per_epoch: int) -> bool:
        """Count one optimizer step; True when it ended an epoch."""
        self.optimizer_steps += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainProgress":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class _StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's pre-emption warning); agreed across ranks at step ends."""

    def __init__(self) -> None:
        self.raised = False
        self.failure: Optional[Exception] = None  # a run file rank 0 could not write (history.jsonl)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._previous.setdefault(sig, signal.signal(sig, self._handler))
            except ValueError:  # not the main thread (e.g. embedded use): no pre-emption handling
                pass

    def uninstall(self) -> None:
        """Give the process its own handlers back: after ``fit`` a SIGTERM must stop the caller again
        (a notebook, a test session), not set a flag nobody reads."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one small all-reduce); raises
        :attr:`failure` on every rank when a rank recorded one."""
        signalled, failed = _sum_across_ranks([1.0 if self.raised else 0.0, 1.0 if self.failure is not None else 0.0])
        if failed > 0:
            distributed.agree(self._raise_failure)
        return bool(signalled > 0)

    def check_failure(self) -> None:
        """Raise :attr:`failure` on every rank when a rank recorded one (one small all-reduce)."""
        if _sum_across_ranks([1.0 if self.failure is not None else 0.0])[0] > 0:
            distributed.agree(self._raise_failure)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def _sum_across_ranks(values: list[float]) -> list[float]:
    return collectives.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def prepare_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Check that ``run_dir`` can be written; refuse to clobber an earlier run; with
    --overwrite, clear it (rank 0 only)."""
    run = RunDirectory(run_dir)
    # A resume needs an existing run (find_checkpoint words a missing one): do not create it.
    run.check_writable(create=resume is None)
    if resume is not None:
        return
    existing = run.existing_run_files()
    if existing and not overwrite:
        from relbert_ds.errors import ConfigError

        raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); fix: pass --resume latest to "
                          f"continue it, --overwrite to replace it, or another --output_dir")
    if existing:
        run.clear()


def consolidated_state_dict(module: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU state dict of ``module`` on rank 0 (None elsewhere), any ZeRO stage.

    Under ZeRO-3 each parameter is gathered on its own (a collective on every rank), so the
    peak extra memory is one parameter, not the whole model.
    """
    import deepspeed

    state = module.state_dict()  # buffers are whole; ZeRO-3 parameters are empty placeholders here
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if distributed.is_main():
                out[name] = param.detach().cpu().clone()
    if not distributed.is_main():
        return None
    for name, value in state.items():
        if name not in out:
            out[name] = value.detach().cpu().clone()
    return out


def override_dropout(model: torch.nn.Module, p: float) -> int:
    """Set every dropout probability of ``model`` to ``p``: ``nn.Dropout`` modules and the float
    ``*dropout*`` attributes some attention implementations read at forward time (and the
    config's, for anything built later). Returns how many were set."""
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


class Trainer:
    """Runs one training job; every rank constructs it and calls :meth:`fit` (or
    :meth:`prepare` and then :meth:`train_step` / :meth:`validate` itself)."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.run_dir = Path(run.train.output_dir)
        self.files = RunDirectory(self.run_dir)
        self.stop_flag = _StopFlag()
        self.progress = TrainProgress()
        self.monitor: Optional[TrainingMonitor] = None
        self.prepared = False

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> "Trainer":
        """Join the job, check and load everything, build the engine, resume. Idempotent.

        Every check that user input can fail happens before the engine is built and is agreed
        across ranks (one message from rank 0, no rank left waiting).
        """
        if self.prepared:
            return self
        self.info = distributed.init_distributed()
        distributed.set_threads(self.run.train.threads, self.info.local_world_size)
        self._check_inputs()
        self._log_startup()
        self._build_engine()
        t = self.run.train
        # Measured before any RNG state is restored (it must not move the restored RNG).
        self.peak_flops = device_peak_flops(t.peak_tflops, self.resolved.precision) if distributed.is_main() \
            else (0.0, "")
        # Resume first: a refused resume must leave the run's files as they were.
        if self.resume_dir is not None:
            self._resume()
        distributed.agree(self._write_run_files, main_only=True)  # a full disk stops every rank
        self.monitor = TrainingMonitor(self.files.tensorboard if t.tensorboard else None, distributed.is_main(),
                                       self.steps.total_steps, self.progress.optimizer_steps)
        if distributed.is_main():
            peak, source = self.peak_flops
            log.info("MFU against %.2f TFLOP/s per device (%s)", peak / 1e12, source)
        self.stop_flag.install()
        self.prepared = True
        return self

    def _check_inputs(self) -> None:
        """Everything that can fail on user input, agreed across ranks before any heavy work."""
        run = self.run
        distributed.agree(run.validate)
        if run.train.resume == "auto":
            # Requeued jobs: continue from the newest complete checkpoint, or start afresh (a run
            # that died before its first checkpoint is replaced).
            has = distributed.agree(lambda: checkpointing.latest_complete(self.run_dir) is not None)
            run.train.resume = "latest" if has else None
            run.train.overwrite = run.train.overwrite or not has
        self.resume_dir = distributed.agree(lambda: checkpointing.find_checkpoint(self.run_dir, run.train.resume)) \
            if run.train.resume is not None else None
        distributed.agree(self._load_inputs)
        # Last: bad input must leave no folder behind, and --overwrite must not clear a run that
        # this command then cannot replace.
        distributed.agree(lambda: prepare_run_dir(self.run_dir, run.train.resume, run.train.overwrite), main_only=True)

    def _load_inputs(self) -> None:
        run, m = self.run, self.run.model
        self.train_data = self._load_training_data()
        self.validation_relations = self._load_validation_relations()
        per_source = None
        if len(run.data.train_data) > 1 and self.validation_relations is not None:
            from relbert_ds.data.training_sources import per_source_validation

            per_source = per_source_validation(run.data.train_data, run.validation.validation_split)
        self.analogy_sets: list[AnalogyDataset] = validation.load_validation_sets(
            run.validation.analogy, self.validation_relations, run.validation.validation_split, per_source)
        if run.validation.metric == "analogy" and not self.analogy_sets:
            from relbert_ds.errors import ConfigError

            raise ConfigError("--metric analogy needs at least one --analogy validation set; fix: name one, or use "
                              "--metric loss or none")
        # Every check of model, tokenizer, template and pooling, agreed before any collective.
        RelationEncoder.check_loadable(m.model, template=m.template, pooling=m.pooling, max_length=m.max_length,
                                       trust_remote_code=m.trust_remote_code)
        ds, source = load_ds_config(run.deepspeed_config)
        batch = resolve_batch(ds, source, run.data.relations_per_step, self.info.world_size,
                              run.data.relations_per_rank)
        self.sampler = self._make_sampler(self.train_data, batch.relations_per_step, batch.accumulation)
        from relbert_ds.training.ds_auto import hidden_size_of

        hidden = hidden_size_of(backbones.load_config(backbones.check_model_exists(m.model), m.trust_remote_code))
        self.resolved: ResolvedDeepSpeed = resolve_deepspeed_config(
            run.deepspeed_config, run, self.info.world_size, self.sampler.steps_per_epoch, hidden_size=hidden)
        self.steps = self.resolved.steps
        # DeepSpeed's own monitors (csv, wandb, comet, tensorboard) write into the run directory
        # unless the JSON says where: never into the working directory by surprise.
        for key in ("csv_monitor", "tensorboard", "wandb", "comet"):
            section = self.resolved.config.get(key)
            if isinstance(section, dict) and section.get("enabled") and key != "wandb":
                section.setdefault("output_path", str(self.run_dir / "ds_monitor"))

    def _load_training_data(self) -> RelationDataset:
        d = self.run.data
        data, self.relation_weights = load_train_data(d.train_data, d.train_split, d.train_weights)
        return data

    def _make_sampler(self, data: RelationDataset, relations_per_step: int, accumulation: int) -> RelationAwareSampler:
        d = self.run.data
        return RelationAwareSampler(data, world_size=self.info.world_size, rank=self.info.rank,
                                    relations_per_step=relations_per_step, accumulation=accumulation,
                                    positives_per_relation=d.positives_per_relation,
                                    negatives_per_relation=d.negatives_per_relation, seed=d.seed, tail=d.tail,
                                    parent_grouping=d.parent_grouping, shard_by=d.shard_by,
                                    relation_weights=getattr(self, "relation_weights", None))

    def _load_validation_relations(self) -> Optional[RelationDataset]:
        v, d = self.run.validation, self.run.data
        wanted = v.metric == "loss" or validation.DERIVED_ANALOGY in [a.lower() for a in v.analogy]
        if not (wanted or v.projector):
            return None
        try:
            return load_train_data(d.train_data, v.validation_split)[0]
        except DataError:
            if wanted:
                raise
            return None  # only the projector wanted it

    def _build_engine(self) -> None:
        m, t = self.run.model, self.run.train
        torch.manual_seed(self.run.data.seed)  # identical initialisation of new parameters on every rank
        with model_construction_context(self.resolved):
            self.encoder = RelationEncoder.from_pretrained(
                m.model, template=m.template, pooling=m.pooling, max_length=m.max_length,
                trust_remote_code=m.trust_remote_code, warn_untrained=False)
            if m.dropout is not None:
                override_dropout(self.encoder.backbone, m.dropout)
            if m.gradient_checkpointing:
                self.encoder.backbone.gradient_checkpointing_enable()
            loss = build_loss(t.loss, hidden_size=self.encoder.hidden_size, temperature=t.temperature,
                              margin=t.margin, classification=t.classification_loss)
            module = RelationTrainingModule(self.encoder, loss)
        self.num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in self.encoder.parameters())
        self.matmul_parameters = matmul_parameters(self.encoder)
        self.engine = initialize_engine(module, self.resolved)
        # Dropout differs per rank (like independent workers); the batch plan does not use RNG.
        torch.manual_seed(self.run.data.seed * 1000 + self.info.rank + 1)
        cfg = self.encoder.backbone.config
        self._shape = (int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0),
                       int(self.encoder.hidden_size))

    def _log_startup(self) -> None:
        if not distributed.is_main():
            return
        r = self.resolved
        log.info("relbert-ds %s: %d rank(s) via %s, backend %s", __version__, self.info.world_size, self.info.launcher,
                 self.info.backend)
        log.info("DeepSpeed config: %s", r.source)
        for note in r.notes:
            log.info("  %s", note)
        plan = self.sampler.describe()
        log.info("data: %s (%d relations); %d prompts per step, per rank %s", self.train_data.source,
                 len(self.train_data), plan["prompts_per_step"], plan["prompts_per_rank_first_step"][0])

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.run.to_dict(), "resolved": {"world_size": self.info.world_size, "launcher": self.info.launcher,
                                                     "precision": self.resolved.precision,
                                                     "zero_stage": self.resolved.zero_stage,
                                                     "notes": self.resolved.notes,
                                                     "relations_per_step": self.resolved.relations_per_step,
                                                     "accumulation": self.resolved.accumulation,
                                                     "steps_per_epoch": self.steps.steps_per_epoch,
                                                     "total_steps": self.steps.total_steps,
                                                     "relbert_ds_version": __version__}}
        self.files.write_json(self.files.config, record)
        self.files.write_json(self.files.ds_config, self.resolved.config)

    def _fingerprint(self) -> dict[str, Any]:
        m = self.run.model
        return {"world_size": self.info.world_size, "model": m.model, "template": self.encoder.template,
                "pooling": m.pooling, "max_length": m.max_length, "loss": self.run.train.loss,
                "hidden_size": self.encoder.hidden_size, "num_parameters": int(self.num_parameters)}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Checkpoint the engine and :attr:`progress` (every rank calls it)."""
        p = self.progress
        self.stop_flag.check_failure()  # a checkpoint must not get ahead of a history that stopped
        checkpointing.save_checkpoint(self.engine, self.run_dir, p.optimizer_steps,
                                      {"relbert_ds": {"progress": p.to_dict(), "sampler": self.sampler.state_dict()}},
                                      {**self._fingerprint(), "epoch": p.epoch, "step_in_epoch": p.step_in_epoch},
                                      self.run.train.keep_last)

    def _resume(self) -> None:
        tag_dir = self.resume_dir
        meta = checkpointing.read_meta(tag_dir)
        distributed.agree(lambda: checkpointing.check_compatible(meta, self._fingerprint(), tag_dir))
        client = checkpointing.load_checkpoint(self.engine, tag_dir)
        state = client.get("relbert_ds") or {}
        if "progress" not in state:
            raise CheckpointError(f"{tag_dir} has no relbert-ds progress state; fix: resume from a checkpoint written "
                                  f"by this version of relbert-ds, or start a new run")

        def restore() -> TrainProgress:
            self.sampler.check_state(state.get("sampler"))
            progress = TrainProgress.from_dict(state["progress"])
            self.sampler.check_position(progress.epoch, progress.step_in_epoch)
            return progress

        self.progress = distributed.agree(restore)
        distributed.agree(lambda: self._truncate_history(self.progress.optimizer_steps), main_only=True)
        if distributed.is_main():
            log.info("resumed from %s: epoch %d, step %d, %d optimizer steps done", tag_dir, self.progress.epoch,
                     self.progress.step_in_epoch, self.progress.optimizer_steps)

    def _truncate_history(self, steps: int) -> None:
        """Drop records written after the checkpoint (they are about to be written again)."""
        done_evals = {(e.get("epoch"), e.get("optimizer_step")) for e in self.progress.evaluations}
        keep = []
        lines = self.files.history_lines()
        if not lines and not self.files.history.exists():
            return
        for line in lines:
            record = json.loads(line)
            if record.get("kind") == "step" and record.get("optimizer_step", 0) <= steps:
                keep.append(line)
            elif record.get("kind") != "step" and (record.get("epoch"), record.get("optimizer_step")) in done_evals:
                keep.append(line)
        self.files.rewrite_history(keep)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """Run the next optimizer step of the plan (its micro steps, backward, DeepSpeed's step),
        advance :attr:`progress`, log; return the step's record (the same on every rank except
        for timings)."""
        if not self.prepared:
            self.prepare()
        p, engine, sampler = self.progress, self.engine, self.sampler
        engine.train()
        meter = _StepMeter()
        epoch, step = p.epoch, p.step_in_epoch
        for micro in range(self.resolved.accumulation):
            batch = sampler.local_batch(epoch, step, micro)
            out, tokens, lr = self._forward_backward_step(batch, meter)
            meter.add(out, len(batch), tokens)
        p.advance(sampler.steps_per_epoch)
        layers, hidden = self._shape
        record = meter.close(engine, p.optimizer_steps, epoch, self.info.world_size, self.matmul_parameters, layers,
                             hidden, self.peak_flops[0], lr)
        if distributed.is_main():
            self._append_history(record)
            if p.optimizer_steps % self.run.train.log_every_steps == 0:
                scalars = {f"train/{k}": v for k, v in record.items() if k not in ("kind", "epoch", "optimizer_step")}
                self.monitor.scalars(p.optimizer_steps, scalars)
                self._write_deepspeed_monitor(scalars)
            self.monitor.progress(1, {"loss": f"{record['loss']:.4f}", "pairs/s": f"{record['pairs_per_s']:.0f}",
                                      "mfu": f"{100 * record['mfu']:.1f}%"})
        return record

    def train_on(self, batch: LocalBatch) -> LossOutput:
        """Forward, backward and DeepSpeed's step on a batch the caller built (memory probes,
        experiments); :attr:`progress`, the history and the monitors are left alone. Every rank
        must call it (the loss gathers across ranks)."""
        if not self.prepared:
            self.prepare()
        self.engine.train()
        out, _, _ = self._forward_backward_step(batch, _StepMeter())
        return out

    def _write_deepspeed_monitor(self, scalars: dict[str, float]) -> None:
        """Our scalars into DeepSpeed's monitors (csv, wandb, comet) when the JSON enables one:
        DeepSpeed itself only logs the lr and timings there. Indexed by optimizer step."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            step = self.progress.optimizer_steps
            monitor.write_events([(f"relbert_ds/{name}", float(value), step) for name, value in scalars.items()
                                  if isinstance(value, (int, float)) and math.isfinite(value)])

    def _forward_backward_step(self, batch: LocalBatch, meter: "_StepMeter") -> tuple[LossOutput, int, float]:
        device = self.engine.device
        t0 = time.perf_counter()
        tokens = self.encoder.tokenize(batch.pairs, device=device)
        out = self.engine(**tokens, relation_ids=batch.relation_ids.to(device),
                          is_positive=batch.is_positive.to(device), parent_ids=batch.parent_ids.to(device),
                          pair_ids=batch.pair_ids.to(device))
        t1 = time.perf_counter()
        self.engine.backward(out.loss)
        lr = float(self.engine.get_lr()[0])  # the lr this step uses (step() moves the schedule on)
        t2 = time.perf_counter()
        self.engine.step()  # applies the update at the accumulation boundary only
        meter.time(forward=t1 - t0, backward=t2 - t1, optimizer=time.perf_counter() - t2)
        return out, int(tokens["attention_mask"].sum()), lr

    def _append_history(self, record: dict[str, Any]) -> None:
        """Rank 0 only. A failed write does not raise here (rank 0 alone would leave the other ranks
        in the next step's collectives): it stops the run at the next step end, on every rank."""
        if self.stop_flag.failure is not None:
            return
        try:
            self.files.append_history(record)
        except HistoryError as exc:
            self.stop_flag.failure = exc.stopped(self.progress.optimizer_steps,
                                                 checkpointing.latest_complete(self.run_dir))

    # ------------------------------------------------------------------ the run
    def fit(self) -> TrainResult:
        """Prepare and run the whole job: steps, validation and selection, checkpoints, export."""
        try:
            self.prepare()
            return self._train()
        finally:  # an error mid-run still leaves complete TensorBoard files
            self.stop_flag.uninstall()
            if self.monitor is not None:
                self.monitor.close()

    def _train(self) -> TrainResult:
        outcome = "epoch_end" if self.progress.optimizer_steps < self.steps.total_steps else "done"
        while outcome == "epoch_end":
            outcome = self._run_epoch()
        preempted = outcome == "preempted"
        final = None
        if preempted:
            self.monitor.write(f"stopped by a signal after optimizer step {self.progress.optimizer_steps}: checkpoint "
                               f"saved, exiting with status {PREEMPTED_EXIT_CODE} so the job can be requeued")
        else:
            evals = self.progress.evaluations
            final = str(self.export(self.files.model, evals[-1] if evals else None, self.progress.best))
            if self.run.train.push_to_hub and distributed.is_main():
                from relbert_ds.publish.hub import push_to_hub

                # the model chosen on validation when there is one; repeated pushes update the repo
                chosen = self.run_dir / "best_model"
                push_to_hub(str(chosen if chosen.exists() else final), self.run.train.push_to_hub, exist_ok=True)
        best_dir = self.files.best_model
        b = self.progress.best
        return TrainResult(str(self.run_dir), final, str(best_dir) if best_dir.exists() else None, b["epoch"],
                           b.get("step"), b["score"], self.progress.optimizer_steps, preempted,
                           list(self.progress.evaluations))

    def _run_epoch(self) -> str:
        """Steps until the epoch ends ("epoch_end"), the run ends ("done"), a signal arrives
        ("preempted") or early stopping triggers ("early_stop")."""
        t, p = self.run.train, self.progress
        while True:
            self.train_step()
            done = p.optimizer_steps >= self.steps.total_steps
            epoch_end = p.step_in_epoch == 0
            saved = False
            if self._validation_due(epoch_end, done):
                if self._validate_and_select(epoch_end):
                    return "early_stop"
                saved = True
            elif t.save_every_steps and p.optimizer_steps % t.save_every_steps == 0 and not done:
                self.save()
                saved = True
            if self.stop_flag.agreed():
                if not saved:
                    self.save()
                return "preempted"
            if done:
                return "done"
            if epoch_end:
                return "epoch_end"

    def _validation_due(self, epoch_end: bool, done: bool) -> bool:
        every = self.run.train.eval_every_steps
        if every:
            return done or self.progress.optimizer_steps % every == 0
        return done or epoch_end

    def _validate_and_select(self, epoch_end: bool) -> bool:
        """Validate, keep the best model, record, checkpoint; True when early stopping says stop."""
        p, v, t = self.progress, self.run.validation, self.run.train
        result = self.validate()
        # The epoch a validation belongs to: the one that just ended, or the one in progress.
        result["epoch"] = p.epoch - 1 if epoch_end else p.epoch
        if self._is_better(result):
            p.best = {"epoch": result["epoch"], "step": p.optimizer_steps, "metric": result.get("metric"),
                      "score": result.get("score")}
            p.stale = 0
            if v.metric != "none" and t.export_best:
                self.export(self.files.best_model, epoch_results=result, best=p.best)
        else:
            p.stale += 1
        result["best_epoch"], result["best_step"] = p.best["epoch"], p.best["step"]
        p.evaluations.append(result)
        if distributed.is_main():
            # "epoch" records at the epoch cadence (the last one may close a partial epoch), "eval" every N steps
            self._append_history({"kind": "eval" if t.eval_every_steps else "epoch", **result})
            self.monitor.write(_validation_line(result))
        self.save()
        if v.early_stop_patience and p.stale >= v.early_stop_patience:
            self.monitor.write(f"early stop: no improvement for {p.stale} validations")
            return True
        return False

    def _is_better(self, result: dict[str, Any]) -> bool:
        best = self.progress.best
        if self.run.validation.metric == "none":
            return True  # the last validation is the model
        score = result.get("score")
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return best["epoch"] is None
        return best["score"] is None or score > best["score"]

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, Any]:
        """The validation sets through the evaluator's path (a collective); logs on rank 0."""
        v, p = self.run.validation, self.progress
        start = time.perf_counter()
        result: dict[str, Any] = {"epoch": p.epoch, "optimizer_step": p.optimizer_steps}
        if self.analogy_sets:
            result["analogy"] = validation.analogy_accuracies(self.encoder, self.analogy_sets, v.batch_size)
            result["analogy_mean"] = sum(result["analogy"].values()) / len(result["analogy"])
        if self.validation_relations is not None and v.metric != "none":
            result["loss"] = self._validation_loss()
        if v.metric == "analogy":
            result["metric"], result["score"] = "analogy_mean", result["analogy_mean"]
        elif v.metric == "loss":
            result["metric"], result["score"] = "loss", -result["loss"]
        projector = v.projector and self.validation_relations is not None and self.run.train.tensorboard
        pairs = [pair for g in self.validation_relations.relations for pair in g.positives] if projector else []
        vectors = validation.encode_pairs(self.encoder, pairs, v.batch_size) if pairs else None
        result["seconds"] = time.perf_counter() - start
        if distributed.is_main():
            scalars = {f"val/analogy/{k}": a for k, a in result.get("analogy", {}).items()}
            if "analogy_mean" in result:
                scalars["val/analogy_mean"] = result["analogy_mean"]
            if "loss" in result:
                scalars["val/loss"] = result["loss"]
            self.monitor.scalars(p.optimizer_steps, scalars)
            if vectors is not None:
                self._write_projector(torch.from_numpy(vectors), p.optimizer_steps)
            self.monitor.flush()
        return result

    def _validation_loss(self) -> float:
        """Mean loss over the validation relations (no gradients), with the training loss and
        the training batch size (capped at the validation relations' count)."""
        data = self.validation_relations
        per_step = min(self.resolved.relations_per_step // self.resolved.accumulation, len(data))
        try:
            sampler = RelationAwareSampler(data, world_size=self.info.world_size, rank=self.info.rank,
                                           relations_per_step=per_step,
                                           positives_per_relation=self.run.data.positives_per_relation,
                                           negatives_per_relation=self.run.data.negatives_per_relation,
                                           seed=self.run.data.seed, tail="fill", shard_by=self.run.data.shard_by)
        except Exception:  # too few validation prompts for this many ranks: no loss to report
            return float("nan")
        was_training = self.engine.module.training
        self.engine.module.eval()
        values = []
        d = self.engine.device
        with torch.no_grad():
            for step in range(sampler.steps_per_epoch):
                batch = sampler.local_batch(0, step)
                tokens = self.encoder.tokenize(batch.pairs, device=d)
                out = self.engine.module(**tokens, relation_ids=batch.relation_ids.to(d),
                                         is_positive=batch.is_positive.to(d), parent_ids=batch.parent_ids.to(d),
                                         pair_ids=batch.pair_ids.to(d))
                values.append(out.value)
        self.engine.module.train(was_training)
        return sum(values) / len(values)

    def _write_projector(self, vectors: torch.Tensor, step: int) -> None:
        labels = [(group.relation_type, group.parent or "") for group in self.validation_relations.relations
                  for _ in group.positives]
        self.monitor.embeddings(step, vectors, labels, ["relation", "parent"], tag="validation_relations")

    # ------------------------------------------------------------------ export
    def export(self, directory: Path, epoch_results: Optional[dict] = None, best: Optional[dict] = None) -> Path:
        """Write a Hugging Face folder (all ranks call: ZeRO-3 weights are gathered)."""
        state = consolidated_state_dict(self.engine.module)
        # Rank 0 writes; agreed, so that a full disk stops every rank with one line (not a
        # traceback on rank 0 and a peer left in a barrier).
        distributed.agree(lambda: self.files.write_folder(
            directory, lambda tmp: self._write_export(tmp, state, epoch_results, best)), main_only=True)
        return directory

    def _write_export(self, tmp: Path, state: dict[str, torch.Tensor], epoch_results: Optional[dict],
                      best: Optional[dict]) -> None:
        """Rank 0: the export's files into ``tmp`` (which then replaces the export folder)."""
        prefix = "encoder.backbone."
        backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.encoder.save_pretrained(tmp, state_dict=backbone_state,
                                     relbert_compatible=self.run.train.relbert_compatible)
        extra = {k: v for k, v in state.items() if k.startswith("loss.")}
        if extra:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / "relbert_ds_loss_head.safetensors"))
        # One record: the export's relbert_ds_training.json, and what its model card is written from.
        schedule = self.resolved.schedule
        record = {**self.run.to_dict(), "deepspeed": self.resolved.config, "world_size": self.info.world_size,
                  "relations_per_step": self.resolved.relations_per_step,
                  "optimizer_steps": self.progress.optimizer_steps,
                  "schedule": f"{schedule.describe()} (relbert-ds)" if schedule is not None else None,
                  "validation_results": epoch_results, "best": best}
        write_json(tmp / "relbert_ds_training.json", record)
        from relbert_ds.publish.model_card import build_card

        (tmp / "README.md").write_text(build_card(record, template=self.encoder.template))


class _StepMeter:
    """Accumulates the micro steps of one optimizer step for its record."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.metrics: dict[str, list[float]] = {}
        self.pairs = 0
        self.tokens = 0
        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.start = time.perf_counter()  # a step's clock starts at its first micro step

    def add(self, out: LossOutput, pairs: int, tokens: int) -> None:
        self.values.append(out.value)
        for k, v in out.metrics.items():
            self.metrics.setdefault(k, []).append(v)
        self.pairs += pairs
        self.tokens += tokens

    def time(self, **seconds: float) -> None:
        for k, v in seconds.items():
            self.seconds[k] += v

    def close(self, engine: Any, step: int, epoch: int, world: int, num_params: int, layers: int, hidden: int,
              peak: float, lr: float) -> dict[str, Any]:
        pairs, tokens = _sum_across_ranks([self.pairs, self.tokens])
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        seq = tokens / max(pairs, 1)
        flops = tokens * model_flops_per_token(num_params, layers, hidden, seq)
        grad_norm = engine.get_global_grad_norm()
        record = {"kind": "step", "optimizer_step": step, "epoch": epoch,
                  "loss": sum(self.values) / len(self.values), "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "pairs_per_s": pairs / elapsed, "tokens_per_s": tokens / elapsed,
                  "tflops_per_device": flops / elapsed / world / 1e12,
                  "mfu": (flops / elapsed / world / peak) if peak else 0.0,
                  "peak_memory_mb": peak_memory_bytes() / 2**20, "step_seconds": elapsed,
                  **{f"{k}_seconds": v for k, v in self.seconds.items()}}
        for k, v in self.metrics.items():
            record[k] = sum(v) / len(v)
        return record


def _validation_line(result: dict[str, Any]) -> str:
    parts = [f"epoch {result['epoch']} step {result['optimizer_step']}"]
    if "analogy" in result:
        parts.append(" ".join(f"{k}={100 * v:.1f}" for k, v in result["analogy"].items()))
        parts.append(f"mean={100 * result['analogy_mean']:.1f}")
    if "loss" in result:
        parts.append(f"val_loss={result['loss']:.4f}")
    parts.append(f"best_epoch={result.get('best_epoch')}")
    parts.append(f"({result['seconds']:.1f} s)")
    return " | ".join(parts)
