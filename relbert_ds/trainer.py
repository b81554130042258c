"""The training loop: data -> relation-aware sampler -> encoder -> cross-device loss -> DeepSpeed
step -> monitor -> per-epoch validation and model selection -> checkpoints -> export.

Every rank runs the same code and the same number of steps; collectives happen at the same
points on every rank (the forward under ZeRO-3, the loss's gathers, DeepSpeed's reductions,
validation's sharded encoding, checkpoint saves).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from relbert_ds import __version__, checkpointing, distributed
from relbert_ds.config import RunConfig, write_json
from relbert_ds.data import load_analogy_dataset, load_relation_dataset
from relbert_ds.data.derived import relation_analogy_questions
from relbert_ds.data.schemas import AnalogyDataset, RelationDataset
from relbert_ds.encoder import RelationEncoder
from relbert_ds.engine import initialize_engine, model_construction_context, resolve_deepspeed_config
from relbert_ds.errors import CheckpointError, ConfigError, DataError
from relbert_ds.losses import LossOutput, build_loss
from relbert_ds.monitor import (TrainingMonitor, device_peak_flops, matmul_parameters, model_flops_per_token,
                               peak_memory_bytes)
from relbert_ds.sampler import LocalBatch, RelationAwareSampler

log = logging.getLogger("relbert_ds")

# Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing (the SLURM script requeues).
PREEMPTED_EXIT_CODE = 124
RUN_MARKERS = ("config.json", checkpointing.CHECKPOINTS, "model")


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
    best_metric: Optional[float]
    optimizer_steps: int
    preempted: bool = False
    epochs: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's pre-emption warning); agreed across ranks at step ends."""

    def __init__(self) -> None:
        self.raised = False

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. embedded use): no pre-emption handling
                pass

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one small all-reduce)."""
        if distributed.world_size() == 1:
            return self.raised
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.raised else 0.0], device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_across_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    if distributed.world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor.tolist()


def prepare_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to clobber an earlier run; with --overwrite, clear it (rank 0 only)."""
    if resume is not None:
        return
    existing = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing)}); fix: pass --resume latest to "
                          f"continue it, --overwrite to replace it, or another --output_dir")
    if existing:
        for name in (*RUN_MARKERS, "best_model", "tensorboard", "history.jsonl", "ds_config.json", "results.json"):
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


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


class Trainer:
    """Runs one training job; every rank constructs it and calls :meth:`fit`."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.run_dir = Path(run.train.output_dir)
        self.stop_flag = _StopFlag()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        """Everything that can fail on user input, agreed across ranks before any heavy work."""
        run, info = self.run, self.info
        distributed.agree_on_errors(lambda: run.validate())
        if run.train.resume == "auto":
            # Requeued jobs: continue from the newest complete checkpoint, or start afresh (a run
            # that died before its first checkpoint is replaced).
            has = distributed.agree_on_errors(lambda: checkpointing.latest_complete(self.run_dir) is not None)
            run.train.resume = "latest" if has else None
            run.train.overwrite = run.train.overwrite or not has
        distributed.agree_on_errors(lambda: prepare_run_dir(self.run_dir, run.train.resume, run.train.overwrite),
                                    main_only=True)
        if run.train.resume is not None:
            self.resume_dir = distributed.agree_on_errors(
                lambda: checkpointing.find_checkpoint(self.run_dir, run.train.resume))
        else:
            self.resume_dir = None

        def load() -> None:
            self.train_data = load_relation_dataset(run.data.train_data, run.data.train_split)
            self.validation_relations = self._load_validation_relations()
            self.analogy_sets = self._load_analogy_sets()
            m = run.model
            # Every check of model, tokenizer, template and pooling, agreed before any collective.
            RelationEncoder.check_loadable(m.model, template=m.template, pooling=m.pooling, max_length=m.max_length,
                                           trust_remote_code=m.trust_remote_code)
            # Sampler first: DeepSpeed's schedule length depends on the steps per epoch.
            micro = self._micro_batch_hint()
            self.sampler = self._make_sampler(self.train_data, micro)
            self.resolved = resolve_deepspeed_config(run.deepspeed_config, run, info.world_size,
                                                     self.sampler.steps_per_epoch)
            if self.resolved.micro_batch != micro:
                self.sampler = self._make_sampler(self.train_data, self.resolved.micro_batch)
            if self.sampler.steps_per_epoch < self.resolved.accumulation:
                raise ConfigError(f"an epoch has {self.sampler.steps_per_epoch} micro steps, fewer than the "
                                  f"{self.resolved.accumulation} gradient accumulation steps; fix: lower "
                                  f"gradient_accumulation_steps or --relations_per_rank")

        distributed.agree_on_errors(load)

    def _micro_batch_hint(self) -> int:
        from relbert_ds.engine import load_ds_config, resolve_batch

        ds, source = load_ds_config(self.run.deepspeed_config)
        micro, _ = resolve_batch(ds, source, self.run.data.relations_per_rank, self.info.world_size)
        return micro

    def _make_sampler(self, data: RelationDataset, micro: int) -> RelationAwareSampler:
        d = self.run.data
        return RelationAwareSampler(data, world_size=self.info.world_size, rank=self.info.rank,
                                    relations_per_rank=micro, positives_per_relation=d.positives_per_relation,
                                    negatives_per_relation=d.negatives_per_relation, seed=d.seed, tail=d.tail,
                                    parent_grouping=d.parent_grouping)

    def _load_validation_relations(self) -> Optional[RelationDataset]:
        v = self.run.validation
        needed = v.metric == "loss" or "semeval2012" in [a.lower() for a in v.analogy] or v.projector
        if not needed:
            return None
        try:
            return load_relation_dataset(self.run.data.train_data, v.validation_split)
        except DataError:
            if v.metric == "loss" or "semeval2012" in [a.lower() for a in v.analogy]:
                raise
            return None  # only the projector wanted it

    def _load_analogy_sets(self) -> list[AnalogyDataset]:
        sets = []
        for name in self.run.validation.analogy:
            if name.lower() == "semeval2012":
                if self.validation_relations is None:
                    raise DataError(f"--analogy semeval2012 needs the {self.run.validation.validation_split!r} split "
                                    f"of {self.run.data.train_data}. Fix: pass --validation_split or drop it")
                sets.append(relation_analogy_questions(self.validation_relations))
            else:
                sets.append(load_analogy_dataset(name, "valid"))
        if self.run.validation.metric == "analogy" and not sets:
            raise ConfigError("--metric analogy needs at least one --analogy validation set; fix: name one, or use "
                              "--metric loss or none")
        return sets

    def _build_engine(self) -> None:
        m, t = self.run.model, self.run.train
        torch.manual_seed(self.run.data.seed)  # identical initialisation of new parameters on every rank
        with model_construction_context(self.resolved):
            self.encoder = RelationEncoder.from_pretrained(m.model, template=m.template, pooling=m.pooling,
                                                           max_length=m.max_length, trust_remote_code=m.trust_remote_code)
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

    # ------------------------------------------------------------------ main entry
    def fit(self) -> TrainResult:
        self.info = distributed.init_distributed()
        self._set_threads()
        self._setup()
        self._log_startup()
        self._build_engine()
        t = self.run.train
        # Measured before any RNG state is restored (it must not move the restored RNG).
        self.peak_flops = device_peak_flops(t.peak_tflops, self.resolved.precision) if distributed.is_main() \
            else (0.0, "")
        # Resume first: a refused resume must leave the run's files as they were.
        state = self._resume() if self.resume_dir is not None else {}
        if distributed.is_main():
            self._write_run_files()
        self.stop_flag.install()
        try:
            return self._loop(state)
        finally:  # an error mid-run still leaves complete TensorBoard files
            if getattr(self, "monitor", None) is not None:
                self.monitor.close()

    def _set_threads(self) -> None:
        if torch.cuda.is_available():
            return
        threads = self.run.train.threads or max(1, (os.cpu_count() or 1) // max(1, self.info.local_world_size))
        torch.set_num_threads(threads)

    def _log_startup(self) -> None:
        if not distributed.is_main():
            return
        r = self.resolved
        log.info("relbert-ds %s: %d rank(s) via %s, backend %s", __version__, self.info.world_size, self.info.launcher,
                 self.info.backend)
        log.info("DeepSpeed config: %s", r.source)
        for note in r.notes:
            log.info("  %s", note)
        log.info("data: %s (%d relations), %d micro steps per epoch x %d epochs", self.train_data.source,
                 len(self.train_data), self.sampler.steps_per_epoch, self.run.train.epochs)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.run.to_dict(), "resolved": {"world_size": self.info.world_size, "launcher": self.info.launcher,
                                                     "precision": self.resolved.precision,
                                                     "zero_stage": self.resolved.zero_stage,
                                                     "notes": self.resolved.notes,
                                                     "steps_per_epoch": self.sampler.steps_per_epoch,
                                                     "relbert_ds_version": __version__}}
        write_json(self.run_dir / "config.json", record)
        write_json(self.run_dir / "ds_config.json", self.resolved.config)

    def _fingerprint(self) -> dict[str, Any]:
        m = self.run.model
        return {"world_size": self.info.world_size, "model": m.model, "template": self.encoder.template,
                "pooling": m.pooling, "max_length": m.max_length, "loss": self.run.train.loss, "hidden_size": self.encoder.hidden_size,
                "num_parameters": int(self.num_parameters)}

    def _resume(self) -> dict[str, Any]:
        tag_dir = self.resume_dir
        meta = checkpointing.read_meta(tag_dir)
        distributed.agree_on_errors(lambda: checkpointing.check_compatible(meta, self._fingerprint(), tag_dir))
        client = checkpointing.load_checkpoint(self.engine, tag_dir)
        state = client.get("relbert_ds")
        if state is None:
            raise CheckpointError(f"{tag_dir} has no relbert-ds state; fix: resume from a checkpoint written by "
                                  f"relbert-ds")
        distributed.agree_on_errors(lambda: self.sampler.load_state_dict(state["sampler"]))
        if distributed.is_main():
            self._truncate_history(state["optimizer_steps"])
            log.info("resumed from %s: epoch %d, step %d, %d optimizer steps done", tag_dir, *self.sampler.position,
                     state["optimizer_steps"])
        return state

    def _truncate_history(self, steps: int) -> None:
        """Drop records of steps after the checkpoint (they are about to be run again)."""
        path = self.run_dir / "history.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("optimizer_step", 0) <= steps
                and not (json.loads(line).get("kind") == "epoch" and json.loads(line)["epoch"] >= self.sampler.position[0])]
        path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ the loop
    def _loop(self, state: dict[str, Any]) -> TrainResult:
        t, engine, sampler = self.run.train, self.engine, self.sampler
        accum = self.resolved.accumulation
        micro_per_epoch = sampler.steps_per_epoch - sampler.steps_per_epoch % accum
        steps_per_epoch = micro_per_epoch // accum
        total_steps = min(t.max_steps or math.inf, steps_per_epoch * t.epochs)
        opt_steps = int(state.get("optimizer_steps", 0))
        best = state.get("best", {"epoch": None, "metric": None, "score": None})
        stale = int(state.get("stale_epochs", 0))
        epochs_log: list[dict[str, Any]] = list(state.get("epochs", []))
        monitor = TrainingMonitor(self.run_dir / "tensorboard" if t.tensorboard else None, distributed.is_main(),
                                  int(total_steps), opt_steps)
        self.monitor = monitor
        peak, peak_source = self.peak_flops
        if distributed.is_main():
            log.info("MFU against %.2f TFLOP/s per device (%s)", peak / 1e12, peak_source)
        cfg = self.encoder.backbone.config
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
        preempted, done = False, opt_steps >= total_steps
        start_epoch, start_micro = sampler.position
        window = _Window()
        for epoch in range(start_epoch, t.epochs):
            if done:
                break
            engine.train()
            first = start_micro if epoch == start_epoch else 0
            for micro in range(first, micro_per_epoch):
                if window.micro == 0:  # a step's clock starts here: validation and checkpoints are not steps
                    window.start = time.perf_counter()
                batch = sampler.local_batch(epoch, micro)
                out, tokens = self._micro_step(batch)
                window.add(out, len(batch), tokens)
                if (micro + 1) % accum:
                    continue
                opt_steps += 1
                sampler.position = (epoch, micro + 1) if micro + 1 < micro_per_epoch else (epoch + 1, 0)
                record = window.close(engine, opt_steps, epoch, self.info.world_size, self.matmul_parameters, layers,
                                      cfg.hidden_size, peak, self.lr)
                if distributed.is_main():
                    self._append_history(record)
                    if opt_steps % t.log_every_steps == 0:
                        monitor.scalars(opt_steps, {f"train/{k}": v for k, v in record.items()
                                                    if k not in ("kind", "epoch", "optimizer_step", "micro_step")})
                    monitor.progress(1, {"loss": f"{record['loss']:.4f}", "pairs/s": f"{record['pairs_per_s']:.0f}",
                                         "mfu": f"{100 * record['mfu']:.1f}%"})
                done = opt_steps >= total_steps
                preempted = self.stop_flag.agreed()
                if preempted or (t.save_every_steps and opt_steps % t.save_every_steps == 0 and not done
                                 and sampler.position[1] != 0):
                    self._save(opt_steps, best, stale, epochs_log)
                if preempted or done:
                    break
            if preempted:
                break
            if sampler.position[1] == 0 or done:  # the epoch (or the run) ended: validate and select
                result = self._validate(epoch, opt_steps)
                improved = self._is_better(result, best)
                if improved:
                    best = {"epoch": epoch, "metric": result.get("metric"), "score": result.get("score")}
                    stale = 0
                    if self.run.validation.metric != "none" and t.export_best:
                        self.export(self.run_dir / "best_model", epoch_results=result, best=best)
                else:
                    stale += 1
                result["best_epoch"] = best["epoch"]
                epochs_log.append(result)
                if distributed.is_main():
                    self._append_history({"kind": "epoch", **result})
                    monitor.write(_epoch_line(result))
                self._save(opt_steps, best, stale, epochs_log)
                patience = self.run.validation.early_stop_patience
                if patience and stale >= patience:
                    monitor.write(f"early stop: no improvement for {stale} epochs")
                    break
        if preempted:
            monitor.write(f"stopped by a signal after optimizer step {opt_steps}: checkpoint saved, exiting "
                          f"with status {PREEMPTED_EXIT_CODE} so the job can be requeued")
        final = None
        if not preempted:
            final = str(self.export(self.run_dir / "model", epoch_results=epochs_log[-1] if epochs_log else None,
                                    best=best))
        best_dir = self.run_dir / "best_model"
        return TrainResult(str(self.run_dir), final, str(best_dir) if best_dir.exists() else None, best["epoch"],
                           best["score"], opt_steps, preempted, epochs_log)

    def _micro_step(self, batch: LocalBatch) -> tuple[LossOutput, int]:
        tokens = self.encoder.tokenize(batch.pairs, device=self.engine.device)
        device = self.engine.device
        out = self.engine(**tokens, relation_ids=batch.relation_ids.to(device),
                          is_positive=batch.is_positive.to(device), parent_ids=batch.parent_ids.to(device),
                          pair_ids=batch.pair_ids.to(device))
        self.engine.backward(out.loss)
        self.lr = float(self.engine.get_lr()[0])  # the lr this step uses (step() moves the schedule on)
        self.engine.step()
        return out, int(tokens["attention_mask"].sum())

    def _append_history(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "history.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _save(self, opt_steps: int, best: dict, stale: int, epochs_log: list) -> None:
        state = {"optimizer_steps": opt_steps, "sampler": self.sampler.state_dict(), "best": best,
                 "stale_epochs": stale, "epochs": epochs_log}
        checkpointing.save_checkpoint(self.engine, self.run_dir, opt_steps, {"relbert_ds": state},
                                      {**self._fingerprint(), "epoch": self.sampler.position[0],
                                       "micro_step": self.sampler.position[1]}, self.run.train.keep_last)

    # ------------------------------------------------------------------ validation
    def _validate(self, epoch: int, opt_steps: int) -> dict[str, Any]:
        from relbert_ds.evaluation.analogy import score_analogy
        from relbert_ds.evaluation.sharding import encode_sharded

        v = self.run.validation
        start = time.perf_counter()
        result: dict[str, Any] = {"epoch": epoch, "optimizer_step": opt_steps}
        pairs: list = []
        for dataset in self.analogy_sets:
            for q in dataset.questions:
                pairs.append(q.stem)
                pairs.extend(q.choices)
        projector_pairs: list = []
        if v.projector and self.validation_relations is not None and self.run.train.tensorboard:
            for group in self.validation_relations.relations:
                projector_pairs.extend(group.positives)
        # One sharded encoding for everything validation needs (a collective on every rank).
        vectors = encode_sharded(self.encoder, pairs + projector_pairs, batch_size=v.batch_size) \
            if pairs or projector_pairs else None
        if pairs:
            table = dict(zip(pairs, vectors[:len(pairs)]))
            lookup = lambda ps: __import__("numpy").stack([table[p] for p in ps])  # noqa: E731
            accuracies = {}
            for dataset in self.analogy_sets:
                accuracies[dataset.name] = score_analogy(dataset, lookup)["accuracy"]
            result["analogy"] = accuracies
            result["analogy_mean"] = sum(accuracies.values()) / len(accuracies)
        if v.metric == "loss" or self.validation_relations is not None and v.metric != "none":
            if self.validation_relations is not None:
                result["loss"] = self._validation_loss()
        if v.metric == "analogy":
            result["metric"], result["score"] = "analogy_mean", result["analogy_mean"]
        elif v.metric == "loss":
            result["metric"], result["score"] = "loss", -result["loss"]
        result["seconds"] = time.perf_counter() - start
        if distributed.is_main():
            scalars = {f"val/analogy/{k}": a for k, a in result.get("analogy", {}).items()}
            if "analogy_mean" in result:
                scalars["val/analogy_mean"] = result["analogy_mean"]
            if "loss" in result:
                scalars["val/loss"] = result["loss"]
            self.monitor.scalars(opt_steps, scalars)
            if projector_pairs:
                self._write_projector(torch.from_numpy(vectors[len(pairs):]), opt_steps)
            self.monitor.flush()
        return result

    def _validation_loss(self) -> float:
        """Mean loss over the validation relations (no gradients), with the training loss."""
        data = self.validation_relations
        world = self.info.world_size
        per_rank = max(1, min(self.resolved.micro_batch, len(data) // world))
        if per_rank * world > len(data):
            return float("nan")
        sampler = RelationAwareSampler(data, world_size=world, rank=self.info.rank, relations_per_rank=per_rank,
                                       positives_per_relation=self.run.data.positives_per_relation,
                                       negatives_per_relation=self.run.data.negatives_per_relation,
                                       seed=self.run.data.seed, tail="fill")
        was_training = self.engine.module.training
        self.engine.module.eval()
        values = []
        with torch.no_grad():
            for step in range(sampler.steps_per_epoch):
                batch = sampler.local_batch(0, step)
                tokens = self.encoder.tokenize(batch.pairs, device=self.engine.device)
                d = self.engine.device
                out = self.engine.module(**tokens, relation_ids=batch.relation_ids.to(d),
                                         is_positive=batch.is_positive.to(d), parent_ids=batch.parent_ids.to(d),
                                         pair_ids=batch.pair_ids.to(d))
                values.append(out.value)
        self.engine.module.train(was_training)
        return sum(values) / len(values)

    def _write_projector(self, vectors: torch.Tensor, step: int) -> None:
        labels, parents = [], []
        for group in self.validation_relations.relations:
            for _ in group.positives:
                labels.append(group.relation_type)
                parents.append(group.parent or "")
        self.monitor.embeddings(step, vectors, list(zip(labels, parents)), ["relation", "parent"],
                                tag="validation_relations")

    def _is_better(self, result: dict[str, Any], best: dict[str, Any]) -> bool:
        if self.run.validation.metric == "none":
            return True  # the last epoch is the model
        score = result.get("score")
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return best["epoch"] is None
        return best["score"] is None or score > best["score"]

    # ------------------------------------------------------------------ export
    def export(self, directory: Path, epoch_results: Optional[dict] = None, best: Optional[dict] = None) -> Path:
        """Write a Hugging Face folder (all ranks call: ZeRO-3 weights are gathered)."""
        state = consolidated_state_dict(self.engine.module)
        if distributed.is_main():
            prefix = "encoder.backbone."
            backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            tmp = directory.with_name(directory.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            self.encoder.save_pretrained(tmp, state_dict=backbone_state)
            extra = {k: v for k, v in state.items() if k.startswith("loss.")}
            if extra:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / "relbert_ds_loss_head.safetensors"))
            write_json(tmp / "relbert_ds_training.json", {**self.run.to_dict(), "deepspeed": self.resolved.config,
                                                           "world_size": self.info.world_size,
                                                           "validation": epoch_results, "best": best})
            (tmp / "README.md").write_text(self._model_card(epoch_results, best))
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
        distributed.barrier()
        return directory

    def _model_card(self, results: Optional[dict], best: Optional[dict]) -> str:
        from relbert_ds.model_card import model_card

        return model_card(self.run, self.resolved, self.info.world_size, results, best, self.encoder.template)


class _Window:
    """Accumulates the micro steps of one optimizer step for logging."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values: list[float] = []
        self.metrics: dict[str, list[float]] = {}
        self.pairs = 0
        self.tokens = 0
        self.micro = 0
        self.start = time.perf_counter()

    def add(self, out: LossOutput, pairs: int, tokens: int) -> None:
        self.values.append(out.value)
        for k, v in out.metrics.items():
            self.metrics.setdefault(k, []).append(v)
        self.pairs += pairs
        self.tokens += tokens
        self.micro += 1

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
                  "peak_memory_mb": peak_memory_bytes() / 2**20, "step_seconds": elapsed}
        for k, v in self.metrics.items():
            record[k] = sum(v) / len(v)
        self.reset()
        return record


def _epoch_line(result: dict[str, Any]) -> str:
    parts = [f"epoch {result['epoch']}"]
    if "analogy" in result:
        parts.append(" ".join(f"{k}={100 * v:.1f}" for k, v in result["analogy"].items()))
        parts.append(f"mean={100 * result['analogy_mean']:.1f}")
    if "loss" in result:
        parts.append(f"val_loss={result['loss']:.4f}")
    parts.append(f"best_epoch={result.get('best_epoch')}")
    parts.append(f"({result['seconds']:.1f} s)")
    return " | ".join(parts)
