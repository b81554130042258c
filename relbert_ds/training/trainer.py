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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from relbert_ds import __version__
from relbert_ds.data.schemas import AnalogyDataset, RelationDataset
from relbert_ds.data.training_sources import load_train_data
from relbert_ds.errors import CheckpointError, DataError, TrainingDiverged
from relbert_ds.evaluation import validation
from relbert_ds.model import backbones
from relbert_ds.model.encoder import RelationEncoder, TruncationWarning
from relbert_ds.parallel import collectives, distributed
from relbert_ds.training import checkpointing
from relbert_ds.training.config import RunConfig
from relbert_ds.training.engine import (
    ResolvedDeepSpeed,
    initialize_engine,
    load_ds_config,
    model_construction_context,
    partitioned_parameters,
    resolve_batch,
    resolve_deepspeed_config,
    step_engine,
)
from relbert_ds.training.export import consolidated_state_dict, training_record, write_export
from relbert_ds.training.losses import LossOutput, build_loss
from relbert_ds.training.monitor import (
    StepMeter,
    TrainingMonitor,
    device_peak_flops,
    matmul_parameters,
    synchronize,
)
from relbert_ds.training.prefetch import MicroBatchPrefetcher, next_position
from relbert_ds.training.run_directory import HistoryError, RunDirectory
from relbert_ds.training.run_lock import RunLock
from relbert_ds.training.same_inputs import analogy_and_model_digests, check_same_inputs, digest_of
from relbert_ds.training.sampler import LocalBatch, RelationAwareSampler
from relbert_ds.training.schedule import StepPlan

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
                is_positive: torch.Tensor, parent_ids: torch.Tensor, pair_ids: torch.Tensor,
                row_counts: Optional[list[int]] = None) -> LossOutput:
        embeddings = self.encoder(input_ids, attention_mask)
        return self.loss(embeddings, relation_ids, is_positive, parent_ids, pair_ids, row_counts)


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
    skipped_updates: int = 0


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
    skipped_updates: int = 0  # optimizer steps whose update DeepSpeed skipped (fp16 overflow, non-finite grads)
    nonfinite_steps: list[int] = field(default_factory=list)  # the current run of non-finite steps, in order

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


def prepare_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool,
                    claim: Optional[Callable[[], Any]] = None) -> None:
    """Check that ``run_dir`` can be written; ``claim`` it (the run lock); refuse to clobber an
    earlier run; with --overwrite, clear it (rank 0 only)."""
    run = RunDirectory(run_dir)
    # A resume needs an existing run (find_checkpoint words a missing one): do not create it.
    run.check_writable(create=resume is None)
    if claim is not None:
        claim()
    if resume is not None:
        return
    existing = run.existing_run_files()
    if existing and not overwrite:
        from relbert_ds.errors import ConfigError

        raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); fix: pass --resume latest to "
                          f"continue it, --overwrite to replace it, or another --output_dir")
    if existing:
        run.clear()


@dataclass(frozen=True)
class TrainingSetup:
    """Everything :meth:`Trainer.prepare` checked, loaded and built; fixed for the rest of the run
    (what changes as the run goes is :class:`TrainProgress`)."""

    info: distributed.DistInfo
    train_data: RelationDataset
    relation_weights: Optional[list[float]]
    validation_relations: Optional[RelationDataset]  # the --validation_split of the training data, when used
    analogy_sets: list[AnalogyDataset]
    sampler: RelationAwareSampler
    resolved: ResolvedDeepSpeed
    resume_dir: Optional[Path]
    encoder: RelationEncoder
    engine: Any  # deepspeed.DeepSpeedEngine wrapping a RelationTrainingModule
    num_parameters: int
    matmul_parameters: int
    layers: int
    peak_flops: tuple[float, str]  # (FLOP/s per device, where the figure came from); rank 0 only

    @property
    def steps(self) -> StepPlan:
        return self.resolved.steps


class Trainer:
    """Runs one training job; every rank constructs it and calls :meth:`fit` (or
    :meth:`prepare` and then :meth:`train_step` / :meth:`validate` itself)."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.run_dir = Path(run.train.output_dir)
        self.files = RunDirectory(self.run_dir)
        self.stop_flag = _StopFlag()
        self.lock = RunLock(self.run_dir)
        self.progress = TrainProgress()
        self.monitor: Optional[TrainingMonitor] = None
        self.setup: Optional[TrainingSetup] = None  # built by prepare()
        self._prefetcher: Optional[MicroBatchPrefetcher] = None  # made at the first train_step

    def _ready(self) -> TrainingSetup:
        if self.setup is None:
            raise RuntimeError("Trainer.prepare() has not run; fix: call it first (train_step and fit call it)")
        return self.setup

    # The set-up's parts most callers want, by their own names.
    @property
    def encoder(self) -> RelationEncoder:
        return self._ready().encoder

    @property
    def engine(self) -> Any:
        return self._ready().engine

    @property
    def sampler(self) -> RelationAwareSampler:
        return self._ready().sampler

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> "Trainer":
        """Join the job, check and load everything, build the engine, resume. Idempotent.

        Every check that user input can fail happens before the engine is built and is agreed
        across ranks (one message from rank 0, no rank left waiting).
        """
        if self.setup is not None:
            return self
        info = distributed.init_distributed()
        distributed.set_threads(self.run.train.threads, info.local_world_size)
        inputs = self._check_inputs(info)
        self._log_startup(info, inputs)
        model = self._build_engine(info, inputs["resolved"])
        if distributed.is_main():
            message = model["encoder"].truncation_warning(inputs["train_data"].pairs, "training pairs")
            if message:
                warnings.warn(message, TruncationWarning, stacklevel=1)
        t = self.run.train
        # Measured before any RNG state is restored (it must not move the restored RNG).
        peak = device_peak_flops(t.peak_tflops, inputs["resolved"].precision) if distributed.is_main() else (0.0, "")
        self.setup = TrainingSetup(info=info, **inputs, **model, peak_flops=peak)
        # Resume first: a refused resume must leave the run's files as they were.
        if self.setup.resume_dir is not None:
            self._resume()
        distributed.agree(self._write_run_files, main_only=True)  # a full disk stops every rank
        self.monitor = TrainingMonitor(self.files.tensorboard if t.tensorboard else None, distributed.is_main(),
                                       self.setup.steps.total_steps, self.progress.optimizer_steps)
        if distributed.is_main():
            log.info("MFU against %.2f TFLOP/s per device (%s)", peak[0] / 1e12, peak[1])
        self.stop_flag.install()
        return self

    def _check_inputs(self, info: distributed.DistInfo) -> dict[str, Any]:
        """Everything that can fail on user input, agreed across ranks before any heavy work."""
        run = self.run
        distributed.agree(run.validate)
        # One run per folder, claimed before anything in it is read (a resume) or changed (--overwrite);
        # a folder that does not exist yet is claimed when prepare_run_dir creates it.
        distributed.agree(lambda: self.run_dir.is_dir() and self._claim_run_dir(), main_only=True)
        if run.train.resume == "auto":
            # Requeued jobs: continue from the newest complete checkpoint, or start afresh (a run
            # that died before its first checkpoint is replaced).
            has = distributed.agree(lambda: checkpointing.latest_complete(self.run_dir) is not None)
            run.train.resume = "latest" if has else None
            run.train.overwrite = run.train.overwrite or not has
        resume_dir = distributed.agree(lambda: checkpointing.find_checkpoint(self.run_dir, run.train.resume)) \
            if run.train.resume is not None else None
        inputs = distributed.agree(lambda: self._load_inputs(info))
        check_same_inputs(lambda: self._fingerprints(inputs))
        if resume_dir is not None:
            self._plan_elastic_resume(resume_dir, inputs["resolved"], info)
        # Last: bad input must leave no folder behind, and --overwrite must not clear a run that
        # this command then cannot replace.
        distributed.agree(lambda: prepare_run_dir(self.run_dir, run.train.resume, run.train.overwrite,
                                                  claim=self._claim_run_dir), main_only=True)
        return {**inputs, "resume_dir": resume_dir}

    def _plan_elastic_resume(self, tag_dir: Path, resolved: ResolvedDeepSpeed, info: distributed.DistInfo) -> None:
        """A checkpoint of another world size: ZeRO 1-3 load it in DeepSpeed's universal form (rank 0
        converts it once, before the engine is built: the engine must know it loads universal)."""
        written_by = distributed.agree(lambda: checkpointing.read_meta(tag_dir).get("world_size"))
        if written_by == info.world_size:
            return
        note = f"resuming a checkpoint written by {written_by} ranks with {info.world_size}"
        if resolved.zero_stage > 0:
            distributed.agree(lambda: checkpointing.convert_to_universal(tag_dir, info.world_size), main_only=True)
            resolved.config.setdefault("checkpoint", {})["load_universal"] = True
            note += f": ZeRO-{resolved.zero_stage} states converted to {checkpointing.universal_dir(tag_dir)}"
        resolved.notes.append(note + "; ranks the checkpoint did not have start their dropout RNG from the seed")

    def _fingerprints(self, inputs: dict[str, Any]) -> dict[str, str]:
        """What this rank read, as digests (compared across ranks by check_same_inputs)."""
        # Named as on the command line (the same on every rank; resolved paths may differ per node).
        train, data = " ".join(self.run.data.train_data), inputs["train_data"]
        out = {f"training data ({train})": digest_of([data.relations, inputs["relation_weights"]]),
               "DeepSpeed config": digest_of(inputs["resolved"].config)}
        if inputs["validation_relations"] is not None:
            out[f"validation data ({train})"] = digest_of(inputs["validation_relations"].relations)
        model = self.run.model.model
        out.update(analogy_and_model_digests(inputs["analogy_sets"], {model: backbones.resolve_model_name(model)}))
        return out

    def _claim_run_dir(self) -> bool:
        """Rank 0: hold the run directory's lock (refused in one line while another run holds it)."""
        if not self.lock.held:
            note = self.lock.acquire()
            if note:
                log.warning(note)
        return True

    def _load_inputs(self, info: distributed.DistInfo) -> dict[str, Any]:
        run, m, d = self.run, self.run.model, self.run.data
        train_data, relation_weights = load_train_data(d.train_data, d.train_split, d.train_weights,
                                                       d.train_weights_mode)
        validation_relations = self._load_validation_relations()
        per_source = None
        if len(d.train_data) > 1 and validation_relations is not None:
            from relbert_ds.data.training_sources import per_source_validation

            per_source = per_source_validation(d.train_data, run.validation.validation_split)
        analogy_sets = validation.load_validation_sets(run.validation.analogy, validation_relations,
                                                       run.validation.validation_split, per_source)
        if run.validation.metric == "analogy" and not analogy_sets:
            from relbert_ds.errors import ConfigError

            raise ConfigError("--metric analogy needs at least one --analogy validation set; fix: name one, or use "
                              "--metric loss or none")
        # Every check of model, tokenizer, template and pooling, agreed before any collective.
        RelationEncoder.check_loadable(m.model, template=m.template, pooling=m.pooling, max_length=m.max_length,
                                       trust_remote_code=m.trust_remote_code)
        ds, source = load_ds_config(run.deepspeed_config)
        batch = resolve_batch(ds, source, d.relations_per_step, info.world_size, d.relations_per_rank)
        sampler = RelationAwareSampler(train_data, world_size=info.world_size, rank=info.rank,
                                       relations_per_step=batch.relations_per_step, accumulation=batch.accumulation,
                                       positives_per_relation=d.positives_per_relation,
                                       negatives_per_relation=d.negatives_per_relation, seed=d.seed, tail=d.tail,
                                       parent_grouping=d.parent_grouping, shard_by=d.shard_by,
                                       relation_weights=relation_weights)
        from relbert_ds.training.ds_auto import hidden_size_of

        hidden = hidden_size_of(backbones.load_config(backbones.check_model_exists(m.model), m.trust_remote_code))
        resolved = resolve_deepspeed_config(run.deepspeed_config, run, info.world_size, sampler.steps_per_epoch,
                                            hidden_size=hidden)
        # DeepSpeed's own monitors (csv, wandb, comet, tensorboard) write into the run directory
        # unless the JSON says where: never into the working directory by surprise.
        for key in ("csv_monitor", "tensorboard", "wandb", "comet"):
            section = resolved.config.get(key)
            if isinstance(section, dict) and section.get("enabled") and key != "wandb":
                section.setdefault("output_path", str(self.run_dir / "ds_monitor"))
        return {"train_data": train_data, "relation_weights": relation_weights,
                "validation_relations": validation_relations, "analogy_sets": analogy_sets, "sampler": sampler,
                "resolved": resolved}

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

    def _build_engine(self, info: distributed.DistInfo, resolved: ResolvedDeepSpeed) -> dict[str, Any]:
        m, t = self.run.model, self.run.train
        torch.manual_seed(self.run.data.seed)  # identical initialisation of new parameters on every rank
        with model_construction_context(resolved):
            encoder = RelationEncoder.from_pretrained(
                m.model, template=m.template, pooling=m.pooling, max_length=m.max_length,
                trust_remote_code=m.trust_remote_code, warn_untrained=False)
            if m.dropout is not None:
                backbones.override_dropout(encoder.backbone, m.dropout)
            if m.gradient_checkpointing:
                encoder.backbone.gradient_checkpointing_enable()
        with partitioned_parameters(resolved):
            loss = build_loss(t.loss, hidden_size=encoder.hidden_size, temperature=t.temperature,
                              margin=t.margin, classification=t.classification_loss)
        # The embeddings cross the wire in bf16 under bf16 training (half the bytes; the backbone's
        # outputs are bf16 anyway); the loss itself and the gradients' reduction stay fp32.
        loss.gather_dtype = torch.bfloat16 if resolved.precision == "bf16" else torch.float32
        module = RelationTrainingModule(encoder, loss)
        num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in encoder.parameters())
        n_matmul = matmul_parameters(encoder)
        engine = initialize_engine(module, resolved)
        # Dropout differs per rank (like independent workers); the batch plan does not use RNG.
        torch.manual_seed(self.run.data.seed * 1000 + info.rank + 1)
        cfg = encoder.backbone.config
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
        return {"encoder": encoder, "engine": engine, "num_parameters": int(num_parameters),
                "matmul_parameters": int(n_matmul), "layers": layers}

    def _log_startup(self, info: distributed.DistInfo, inputs: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        r, data = inputs["resolved"], inputs["train_data"]
        log.info("relbert-ds %s: %d rank(s) via %s, backend %s", __version__, info.world_size, info.launcher,
                 info.backend)
        log.info("DeepSpeed config: %s", r.source)
        for note in r.notes:
            log.info("  %s", note)
        plan = inputs["sampler"].describe()
        log.info("data: %s (%d relations); %d prompts per step, per rank %s", data.source, len(data),
                 plan["prompts_per_step"], plan["prompts_per_rank_first_step"][0])

    def _write_run_files(self) -> None:
        s = self.setup
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.run.to_dict(), "resolved": {"world_size": s.info.world_size, "launcher": s.info.launcher,
                                                     "precision": s.resolved.precision,
                                                     "zero_stage": s.resolved.zero_stage,
                                                     "notes": s.resolved.notes,
                                                     "relations_per_step": s.resolved.relations_per_step,
                                                     "accumulation": s.resolved.accumulation,
                                                     "steps_per_epoch": s.steps.steps_per_epoch,
                                                     "total_steps": s.steps.total_steps,
                                                     "relbert_ds_version": __version__}}
        self.files.write_json(self.files.config, record)
        self.files.write_json(self.files.ds_config, s.resolved.config)

    def _fingerprint(self) -> dict[str, Any]:
        m, s = self.run.model, self.setup
        return {"world_size": s.info.world_size, "model": m.model, "template": s.encoder.template,
                "pooling": m.pooling, "max_length": m.max_length, "loss": self.run.train.loss,
                "hidden_size": s.encoder.hidden_size, "num_parameters": s.num_parameters}

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
        tag_dir, sampler = self.setup.resume_dir, self.setup.sampler
        meta = checkpointing.read_meta(tag_dir)
        distributed.agree(lambda: checkpointing.check_compatible(meta, self._fingerprint(), tag_dir))
        universal = (self.setup.resolved.config.get("checkpoint") or {}).get("load_universal")
        client = checkpointing.load_checkpoint(self.setup.engine, tag_dir,
                                               checkpointing.universal_dir(tag_dir) if universal else None)
        state = client.get("relbert_ds") or {}
        if "progress" not in state:
            raise CheckpointError(f"{tag_dir} has no relbert-ds progress state; fix: resume from a checkpoint written "
                                  f"by this version of relbert-ds, or start a new run")

        def restore() -> TrainProgress:
            sampler.check_state(state.get("sampler"))
            progress = TrainProgress.from_dict(state["progress"])
            sampler.check_position(progress.epoch, progress.step_in_epoch)
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
        setup = self.prepare().setup
        p, engine, sampler = self.progress, setup.engine, setup.sampler
        engine.train()
        meter = StepMeter()
        epoch, step = p.epoch, p.step_in_epoch
        if self._prefetcher is None:  # a worker thread only where a device computes the step
            self._prefetcher = MicroBatchPrefetcher(sampler, setup.encoder, background=engine.device.type == "cuda")
        accumulation = setup.resolved.accumulation
        for micro in range(accumulation):
            # This micro step's batch was drawn and tokenized while the previous one computed; the
            # next one is prepared while this one does.
            batch, host_tokens, row_counts = self._prefetcher.get((epoch, step, micro))
            self._prefetcher.prefetch(next_position((epoch, step, micro), accumulation, sampler.steps_per_epoch))
            out, tokens, lr = self._forward_backward_step(batch, meter, host_tokens, row_counts)
            meter.add(out, len(batch), tokens)
        p.advance(sampler.steps_per_epoch)
        record = meter.close(engine, p.optimizer_steps, epoch, setup.info.world_size, setup.matmul_parameters,
                             setup.layers, setup.encoder.hidden_size, setup.peak_flops[0], lr)
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
        self.prepare().engine.train()
        out, _, _ = self._forward_backward_step(batch, StepMeter())
        return out

    def _write_deepspeed_monitor(self, scalars: dict[str, float]) -> None:
        """Our scalars into DeepSpeed's monitors (csv, wandb, comet) when the JSON enables one:
        DeepSpeed itself only logs the lr and timings there. Indexed by optimizer step."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            step = self.progress.optimizer_steps
            monitor.write_events([(f"relbert_ds/{name}", float(value), step) for name, value in scalars.items()
                                  if isinstance(value, (int, float)) and math.isfinite(value)])

    def _forward_backward_step(self, batch: LocalBatch, meter: StepMeter,
                               host_tokens: Optional[dict[str, torch.Tensor]] = None,
                               row_counts: Optional[list[int]] = None) -> tuple[LossOutput, int, float]:
        """One micro step; ``host_tokens``: the batch already tokenized on the CPU (the prefetcher's);
        ``row_counts``: every rank's rows from the plan (else the loss exchanges them)."""
        device = self.engine.device

        def clock() -> float:
            synchronize(device)
            return time.perf_counter()

        t0 = clock()
        tokens = ({k: v.to(device) for k, v in host_tokens.items()} if host_tokens is not None
                  else self.encoder.tokenize(batch.pairs, device=device))
        out = self.engine(**tokens, relation_ids=batch.relation_ids.to(device),
                          is_positive=batch.is_positive.to(device), parent_ids=batch.parent_ids.to(device),
                          pair_ids=batch.pair_ids.to(device), row_counts=row_counts)
        t1 = clock()
        self.engine.backward(out.loss)
        lr = float(self.engine.get_lr()[0])  # the lr this step uses (step() moves the schedule on)
        t2 = clock()
        if not step_engine(self.engine):
            meter.skipped = True
        meter.time(forward=t1 - t0, backward=t2 - t1, optimizer=clock() - t2)
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
            self.lock.release()
            if self._prefetcher is not None:
                self._prefetcher.close()
            if self.monitor is not None:
                self.monitor.close()

    def _train(self) -> TrainResult:
        outcome = "epoch_end" if self.progress.optimizer_steps < self.setup.steps.total_steps else "done"
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
                chosen = self.files.best_model
                push_to_hub(str(chosen if chosen.exists() else final), self.run.train.push_to_hub, exist_ok=True)
        best_dir = self.files.best_model
        b = self.progress.best
        return TrainResult(str(self.run_dir), final, str(best_dir) if best_dir.exists() else None, b["epoch"],
                           b.get("step"), b["score"], self.progress.optimizer_steps, preempted,
                           list(self.progress.evaluations), self.progress.skipped_updates)

    def _run_epoch(self) -> str:
        """Steps until the epoch ends ("epoch_end"), the run ends ("done"), a signal arrives
        ("preempted") or early stopping triggers ("early_stop")."""
        t, p = self.run.train, self.progress
        while True:
            finite = self._check_finite(self.train_step())
            done = p.optimizer_steps >= self.setup.steps.total_steps
            epoch_end = p.step_in_epoch == 0
            saved = False
            if not finite:
                pass  # no validation and no checkpoint from a model that may hold non-finite weights
            elif self._validation_due(epoch_end, done):
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
                if p.nonfinite_steps and t.max_nonfinite_steps:  # ended inside a non-finite stretch: no export
                    self._diverged()
                return "done"
            if epoch_end:
                return "epoch_end"

    def _check_finite(self, record: dict[str, Any]) -> bool:
        """Count a non-finite step (the same verdict on every rank: the loss is the global one and
        DeepSpeed's skip is collective); raise :class:`TrainingDiverged` after
        ``--max_nonfinite_steps`` of them in a row. False for a non-finite step."""
        p = self.progress
        skipped = bool(record.get("update_skipped"))
        p.skipped_updates += skipped
        if step_is_finite(record["loss"], skipped, self.setup.resolved.precision):
            p.nonfinite_steps = []
            return True
        p.nonfinite_steps.append(record["optimizer_step"])
        limit = self.run.train.max_nonfinite_steps
        if limit and len(p.nonfinite_steps) >= limit:
            self._diverged()
        return False

    def _diverged(self) -> None:
        """Stop every rank with one line (rank 0 reads which checkpoint is latest and words it)."""
        steps = self.progress.nonfinite_steps
        span = f"optimizer step {steps[0]}" if len(steps) == 1 else f"optimizer steps {steps[0]}-{steps[-1]}"
        lr = (self.setup.resolved.config.get("optimizer") or {}).get("params", {}).get("lr")

        def stop() -> None:
            latest = self.files.read_latest()
            kept = (f"the last checkpoint, {self.files.checkpoints / latest}, is from before it and stays latest"
                    if latest else "no checkpoint was written before it")
            raise TrainingDiverged(
                f"training diverged: the loss or the gradient norm was not finite at {span} ({len(steps)} in a row, "
                f"--max_nonfinite_steps {self.run.train.max_nonfinite_steps}; history.jsonl shows where it started); "
                f"{kept}; no model was exported; fix: lower the learning rate (this run: {lr}), raise --warmup_steps "
                f"or set gradient_clipping in the DeepSpeed JSON, then start again with --overwrite")

        distributed.agree(stop, main_only=True)

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
        s = self._ready()
        if s.analogy_sets:
            result["analogy"] = validation.analogy_accuracies(s.encoder, s.analogy_sets, v.batch_size)
            result["analogy_mean"] = sum(result["analogy"].values()) / len(result["analogy"])
        if s.validation_relations is not None and v.metric != "none":
            result["loss"] = self._validation_loss()
        if v.metric == "analogy":
            result["metric"], result["score"] = "analogy_mean", result["analogy_mean"]
        elif v.metric == "loss":
            result["metric"], result["score"] = "loss", -result["loss"]
        projector = v.projector and s.validation_relations is not None and self.run.train.tensorboard
        pairs = [pair for g in s.validation_relations.relations for pair in g.positives] if projector else []
        vectors = validation.encode_pairs(s.encoder, pairs, v.batch_size) if pairs else None
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
        s = self.setup
        data = s.validation_relations
        per_step = min(s.resolved.relations_per_step // s.resolved.accumulation, len(data))
        try:
            sampler = RelationAwareSampler(data, world_size=s.info.world_size, rank=s.info.rank,
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
        labels = [(group.relation_type, group.parent or "") for group in self.setup.validation_relations.relations
                  for _ in group.positives]
        self.monitor.embeddings(step, vectors, labels, ["relation", "parent"], tag="validation_relations")

    # ------------------------------------------------------------------ export
    def export(self, directory: Path, epoch_results: Optional[dict] = None, best: Optional[dict] = None) -> Path:
        """Write a Hugging Face folder (all ranks call: ZeRO-3 weights are gathered)."""
        s = self._ready()
        state = consolidated_state_dict(s.engine.module, s.engine.optimizer)
        record = training_record(self.run, s.resolved, s.info.world_size, self.progress.optimizer_steps,
                                 epoch_results, best)
        # Rank 0 writes; agreed, so that a full disk stops every rank with one line (not a
        # traceback on rank 0 and a peer left in a barrier).
        distributed.agree(lambda: self.files.write_folder(directory, lambda tmp: write_export(
            tmp, s.encoder, state, record, self.run.train.relbert_compatible)), main_only=True)
        return directory


def step_is_finite(loss: float, update_skipped: bool, precision: str) -> bool:
    """Whether an optimizer step went well: a finite loss and an applied update. Under fp16, loss
    scaling skips a step whose scaled gradients overflowed and lowers the scale: normal, so a skipped
    update with a finite loss counts as finite there (and only there)."""
    if not math.isfinite(loss):
        return False
    return not update_skipped or precision == "fp16"


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
