"""Building the DeepSpeed engine: the JSON config checked and resolved, precision, the batch
triad, optimizer and LR schedule, ZeRO-3 model construction. Only this module and the trainer
talk to DeepSpeed.

DeepSpeed's JSON is the source of truth for what is DeepSpeed's. relbert-ds resolves what is
left open in it and records each decision (``ResolvedDeepSpeed.notes``, logged at start-up):
- ``"auto"`` precision: bf16 on GPUs that have it, fp16 with dynamic loss scaling on older
  GPUs, fp32 on CPU (bf16 pays on a CPU only with bf16 instructions such as AMX; ``true`` asks for it);
- the global batch: ``train_batch_size`` (or ``--relations_per_step``) is the number of
  relations per optimizer step over all ranks, whatever the world size (:func:`resolve_batch`);
  the sampler divides its prompts over the ranks, so DeepSpeed's per-rank micro batch is only
  bookkeeping here (it is written so that DeepSpeed's triad assertion holds);
- ``"auto"`` values of Hugging Face-style configs (lr, betas, warm-up, bucket sizes, ...):
  filled from our options and the backbone by :mod:`relbert_ds.training.ds_auto`;
- optimizer/scheduler: taken from the JSON when present (then --lr & co. are refused), else
  from our options: AdamW written into the JSON, and our warm-up schedule (WarmupSchedule)
  handed to ``deepspeed.initialize``.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from relbert_ds.errors import ConfigError
from relbert_ds.parallel import distributed
from relbert_ds.training.config import RunConfig
from relbert_ds.training.schedule import StepPlan, WarmupSchedule, plan_steps

log = logging.getLogger("relbert_ds")

DEFAULT_LR = 2e-5
DEFAULT_WARMUP_STEPS = 10

# Kept identical to ds_configs/zero2.json (a test checks it): what plain `python train.py` uses.
EMBEDDED_DS_CONFIG: dict[str, Any] = {
    # use_multi_rank_bucket_allreduce false: gradient slices reduced to their owners (the reduce-scatter ZeRO-2
    # needs), not DeepSpeed's default all-reduce of every bucket (twice the bytes; benchmarks/zero2_reduction.py)
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": 50000000, "allgather_bucket_size": 50000000,
                          "use_multi_rank_bucket_allreduce": False},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "gradient_clipping": 1.0,
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}


@dataclass
class ResolvedDeepSpeed:
    """The DeepSpeed JSON as passed to ``deepspeed.initialize`` plus what was decided."""

    config: dict[str, Any]
    source: str
    precision: str  # fp32 | bf16 | fp16
    batch: "BatchPlan"
    steps: StepPlan
    zero_stage: int
    notes: list[str] = field(default_factory=list)
    schedule: Optional[WarmupSchedule] = None  # ours; None when the JSON has a scheduler

    @property
    def accumulation(self) -> int:
        return self.batch.accumulation

    @property
    def relations_per_step(self) -> int:
        return self.batch.relations_per_step


def load_ds_config(path: Optional[str]) -> tuple[dict[str, Any], str]:
    """The user's DeepSpeed JSON (or the embedded default) and where it came from."""
    if path is None:
        return copy.deepcopy(EMBEDDED_DS_CONFIG), "embedded default (= ds_configs/zero2.json)"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; fix: pass one of ds_configs/*.json or your own")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path}, line {exc.lineno}: not valid JSON ({exc.msg}); fix: correct "
                          f"the JSON (comments are not allowed)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} is not a JSON object; fix: see ds_configs/zero2.json")
    return data, str(file)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _gpu_info() -> tuple[bool, bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, False, "no GPU"
    # Native bf16 only (compute capability 8.0+, or ROCm): torch's default also counts GPUs that
    # merely emulate it (V100, T4), where bf16 runs several times slower than fp16.
    return True, bool(torch.cuda.is_bf16_supported(including_emulation=False)), torch.cuda.get_device_name()


def resolve_precision(ds: dict[str, Any], source: str, gpu: Optional[tuple[bool, bool, str]] = None) -> tuple[str, str]:
    """Set ``bf16.enabled``/``fp16.enabled`` to booleans; return (precision, why)."""
    has_gpu, has_bf16, device = gpu or _gpu_info()
    bf16 = ds.setdefault("bf16", {})
    fp16 = ds.setdefault("fp16", {})
    want_bf16, want_fp16 = bf16.get("enabled", False), fp16.get("enabled", False)
    if want_bf16 is True and want_fp16 is True:
        raise ConfigError(f"{source} enables both bf16 and fp16; fix: enable at most one (or set both to \"auto\")")
    if want_fp16 is True and not has_gpu:
        raise ConfigError(f"{source} asks for fp16, which needs a GPU and there is none here; fix: set fp16.enabled "
                          f"to false (fp32 runs on CPU) or \"auto\"")
    if want_bf16 is True:
        precision, why = "bf16", "asked for in the DeepSpeed config"
        if not has_gpu:
            why += " (on CPU, bf16 is fast only with bf16 instructions such as AMX: \"auto\" runs fp32)"
        elif not has_bf16:
            raise ConfigError(f"{source} asks for bf16 but {device} does not support it; fix: set bf16.enabled to "
                              f"\"auto\" (fp16 with loss scaling on this GPU)")
    elif want_fp16 is True:
        precision, why = "fp16", "asked for in the DeepSpeed config"
    elif _is_auto(want_bf16) and has_gpu and has_bf16:
        precision, why = "bf16", f"auto: {device} supports bf16"
    elif (_is_auto(want_fp16) or _is_auto(want_bf16)) and has_gpu and not has_bf16:
        precision, why = ("fp16", f"auto: {device} has no bf16, fp16 with dynamic loss scaling") \
            if _is_auto(want_fp16) else ("fp32", f"auto: {device} has no bf16 and fp16 is off")
    else:
        precision, why = "fp32", ("auto: no GPU, fp32 on CPU" if not has_gpu else "bf16/fp16 disabled in the config")
    bf16["enabled"], fp16["enabled"] = precision == "bf16", precision == "fp16"
    return precision, why


DEFAULT_RELATIONS_PER_STEP = 16


@dataclass(frozen=True)
class BatchPlan:
    """The global batch of an optimizer step and how DeepSpeed is told about it."""

    relations_per_step: int  # relations per optimizer step over all ranks (the user's global batch)
    accumulation: int  # micro steps per optimizer step
    world_size: int
    notes: tuple[str, ...] = ()

    @property
    def deepspeed_triad(self) -> tuple[int, int, int]:
        """(micro batch per rank, accumulation, train_batch_size) for DeepSpeed's JSON.

        DeepSpeed asserts ``train_batch_size == micro x accumulation x world``. When the global
        batch divides evenly its unit stays the relation; otherwise DeepSpeed counts one rank's
        share of a micro step as its sample (it only uses these numbers for bookkeeping: the
        sampler, not DeepSpeed, builds the batches).
        """
        a, w = self.accumulation, self.world_size
        if self.relations_per_step % (a * w) == 0:
            return self.relations_per_step // (a * w), a, self.relations_per_step
        return 1, a, a * w


def resolve_batch(ds: dict[str, Any], source: str, relations_per_step: Optional[int], world_size: int,
                  relations_per_rank: Optional[int] = None) -> BatchPlan:
    """The global batch from the options and the DeepSpeed JSON; writes DeepSpeed's triad.

    Sources, first match wins: ``--relations_per_step``; the JSON's ``train_batch_size``
    (global, like ours; the two must agree when both are given); the deprecated
    ``--relations_per_rank`` or the JSON's ``train_micro_batch_size_per_gpu`` (per rank: the
    batch then grows with the world size, which a note says); else 16, with a note on more than
    two ranks, where the old default of 8 relations per rank gave a larger batch.
    """
    def given(key: str) -> Optional[int]:
        value = ds.get(key)
        if value is None or _is_auto(value):
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: {key} is {value!r}; fix: a positive integer or \"auto\"")
        return value

    micro, accum, total = given("train_micro_batch_size_per_gpu"), given("gradient_accumulation_steps"), \
        given("train_batch_size")
    accum = accum or 1
    notes: list[str] = []
    if relations_per_rank is not None:
        if relations_per_step is not None:
            raise ConfigError("--relations_per_rank and --relations_per_step both given; fix: give only "
                              "--relations_per_step (the global batch; --relations_per_rank is deprecated)")
        if micro is not None and micro != relations_per_rank:
            raise ConfigError(f"--relations_per_rank {relations_per_rank} and train_micro_batch_size_per_gpu {micro} "
                              f"in {source} disagree (both are relations per rank); fix: set only one of them")
        relations_per_step = relations_per_rank * world_size
        notes.append(f"--relations_per_rank is deprecated: it makes the global batch grow with the world size; "
                     f"use --relations_per_step {relations_per_step} for this run's batch")
    if relations_per_step is not None and total is not None and total != relations_per_step:
        raise ConfigError(f"--relations_per_step {relations_per_step} and train_batch_size {total} in {source} "
                          f"disagree (both are the global batch in relations); fix: set only one of them")
    if relations_per_step is None and total is not None:
        relations_per_step = total
        if micro is not None and micro * accum * world_size != total:
            raise ConfigError(
                f"{source}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x {accum} "
                f"accumulation steps x {world_size} ranks; fix: drop train_micro_batch_size_per_gpu (relbert-ds "
                f"divides the global batch over the ranks) or set it to \"auto\"")
    if relations_per_step is None and micro is not None:
        relations_per_step = micro * accum * world_size
        notes.append(f"train_micro_batch_size_per_gpu {micro} in {source} is per rank: the global batch "
                     f"({relations_per_step}) grows with the world size; set train_batch_size for a fixed one")
    if relations_per_step is None and world_size > 2:
        # An unchanged multi-GPU command would silently train on a smaller batch than before.
        notes.append(f"the default global batch is {DEFAULT_RELATIONS_PER_STEP} relations per step over all "
                     f"{world_size} ranks (relbert-ds before the world-size-invariant batch used 8 per rank: "
                     f"{8 * world_size} here); for the old batch pass --relations_per_step {8 * world_size}")
    plan = BatchPlan(relations_per_step or DEFAULT_RELATIONS_PER_STEP, accum, world_size, tuple(notes))
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"] = \
        plan.deepspeed_triad
    return plan


def resolve_optimizer(ds: dict[str, Any], source: str, run: RunConfig, total_steps: int, on_cpu: bool,
                      filled_by_auto: frozenset[str] = frozenset()) -> tuple[list[str], Optional[WarmupSchedule]]:
    """Optimizer and scheduler from the JSON or from our options, never both (an option that
    filled an ``"auto"`` of the JSON, listed in ``filled_by_auto``, is not a second source).

    Returns notes and, when the schedule is ours, the :class:`WarmupSchedule` to hand to
    ``deepspeed.initialize`` (None when the JSON's scheduler section rules).
    """
    t, notes = run.train, []
    ours_opt = {"--lr": t.lr, "--weight_decay": t.weight_decay}
    ours_sched = {"--warmup_steps": t.warmup_steps, "--lr_schedule": t.lr_schedule}
    if "optimizer" in ds:
        clash = [k for k, v in ours_opt.items() if v is not None and k not in filled_by_auto]
        if clash:
            raise ConfigError(f"{' and '.join(clash)} given while {source} has an optimizer section; fix: set the "
                              f"learning rate in one place (remove the option or the JSON's optimizer)")
        notes.append(f"optimizer: {ds['optimizer'].get('type')} from {source}")
    else:
        params = {"lr": t.lr if t.lr is not None else DEFAULT_LR,
                  "weight_decay": t.weight_decay if t.weight_decay is not None else 0.0,
                  "betas": [0.9, 0.999], "eps": 1e-8}
        ds["optimizer"] = {"type": "AdamW", "params": params}
        notes.append(f"optimizer: AdamW lr={params['lr']} weight_decay={params['weight_decay']} (relbert-ds options)")
    if "scheduler" in ds:
        clash = [k for k, v in ours_sched.items() if v is not None and k not in filled_by_auto]
        if clash:
            raise ConfigError(f"{' and '.join(clash)} given while {source} has a scheduler section; fix: set the "
                              f"schedule in one place (remove the option or the JSON's scheduler)")
        notes.append(f"scheduler: {ds['scheduler'].get('type')} from {source}")
        schedule = None
    else:
        schedule = WarmupSchedule(t.warmup_steps if t.warmup_steps is not None else DEFAULT_WARMUP_STEPS,
                                  t.lr_schedule or "constant", total_steps)
        notes.append(f"scheduler: {schedule.describe()} (relbert-ds options)")
    if ds["optimizer"].get("type", "").lower() in ("adam", "adamw"):
        notes.append(_choose_adam_kernel(ds, source, on_cpu))
    return notes, schedule


def _offload_device(ds: dict[str, Any]) -> Optional[str]:
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    device = offload.get("device") if isinstance(offload, dict) else None
    return device if device in ("cpu", "nvme") else None


def _deepspeed_op_prebuilt(name: str) -> bool:
    """Whether DeepSpeed was installed with op ``name`` compiled (DS_BUILD_...=1): no JIT then."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(name))


def _compiler_for(op: str) -> Optional[str]:
    """The compiler DeepSpeed's JIT build of ``op`` needs, if it is missing here (else None)."""
    import os
    import shutil

    if op == "fused_adam":
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        found = shutil.which("nvcc") or (cuda_home and Path(cuda_home, "bin", "nvcc").exists())
        return None if found else "nvcc (the CUDA toolkit)"
    return None if (shutil.which("c++") or shutil.which("g++")) else "a C++ compiler"


def _choose_adam_kernel(ds: dict[str, Any], source: str, on_cpu: bool) -> str:
    """Which Adam implementation DeepSpeed builds; returns the note that says why.

    DeepSpeed's own kernels (FusedAdam on GPU, cpu_adam for ZeRO-Offload) are JIT-compiled on
    first use unless installed prebuilt: a minute of every job, and a MissingCUDAException on a
    pip-only cluster without nvcc. torch's AdamW needs no compiler: fused on the GPU (one kernel
    for all parameters, what FusedAdam does), and on the host for offloaded optimizer states.
    ``"torch_adam": false`` in the JSON asks for DeepSpeed's kernels (refused in one line when
    they would have to be compiled and the compiler is missing); prebuilt ones are used as they are.
    """
    params = ds["optimizer"].setdefault("params", {})
    offload = _offload_device(ds)
    # the DeepSpeed op that would be JIT-built: none for plain torch on CPU
    op = "cpu_adam" if offload else (None if on_cpu else "fused_adam")
    if params.get("torch_adam") is False:
        missing = None if op is None or _deepspeed_op_prebuilt(op) else _compiler_for(op)
        if missing:
            raise ConfigError(f"{source} asks for DeepSpeed's Adam kernel (torch_adam: false), which must be compiled "
                              f"({op}) and {missing} is missing here; fix: remove \"torch_adam\": false (torch's "
                              f"AdamW needs no compiler) or install DeepSpeed with DS_BUILD_{op.upper()}=1")
        return f"optimizer kernel: DeepSpeed's {op or 'Adam'} (torch_adam: false in {source})"
    if params.get("torch_adam") is None and op is not None and not on_cpu and _deepspeed_op_prebuilt(op):
        return f"optimizer kernel: DeepSpeed's prebuilt {op}"
    if offload == "nvme":
        # ZeRO-Infinity's optimizer swapping works with DeepSpeed's CPU Adam only.
        return "optimizer kernel: DeepSpeed's cpu_adam (NVMe offload needs it; compiled on first use)"
    params["torch_adam"] = True
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # DeepSpeed would insist on its cpu_adam with offload
    if on_cpu:
        return "optimizer kernel: torch's AdamW (no compiled DeepSpeed kernel on CPU)"
    params.setdefault("fused", True)
    where = "on the host (offloaded optimizer states)" if offload else "on the GPU"
    return f"optimizer kernel: torch's fused AdamW {where}, no compilation (\"torch_adam\": false for DeepSpeed's)"


def resolve_deepspeed_config(path: Optional[str], run: RunConfig, world_size: int,
                             steps_per_epoch: Optional[int] = None, gpu: Optional[tuple[bool, bool, str]] = None,
                             hidden_size: Optional[int] = None) -> ResolvedDeepSpeed:
    """Load and resolve the DeepSpeed JSON for this run (pure: no process group needed).

    ``steps_per_epoch`` (optimizer steps, from the sampler) sizes the run and its schedule
    (:func:`relbert_ds.training.schedule.plan_steps`); ``hidden_size`` fills "auto" ZeRO bucket sizes.
    """
    from relbert_ds.training.ds_auto import auto_options, resolve_hf_auto

    ds, source = load_ds_config(path)
    gpu = gpu or _gpu_info()
    for key in ("bf16", "fp16", "zero_optimization"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{source}: '{key}' must be an object; fix: see ds_configs/zero2.json")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage is {stage!r}; fix: use 0, 1, 2 or 3")
    precision, why = resolve_precision(ds, source, gpu)
    batch = resolve_batch(ds, source, run.data.relations_per_step, world_size, run.data.relations_per_rank)
    steps = plan_steps(steps_per_epoch or 1, run.train.epochs, run.train.max_steps)
    notes = [f"precision: {precision} ({why})", f"ZeRO stage {stage}",
             f"batch: {batch.relations_per_step} relations per optimizer step over {world_size} rank(s), "
             f"{batch.accumulation} micro step(s) each; {steps.steps_per_epoch} steps per epoch, "
             f"{steps.total_steps} in all", *batch.notes]
    t = run.train
    filled_by_auto = frozenset(auto_options(ds))  # before the "auto" values are replaced
    notes += resolve_hf_auto(ds, source, lr=t.lr if t.lr is not None else DEFAULT_LR,
                             weight_decay=t.weight_decay if t.weight_decay is not None else 0.0,
                             warmup_steps=t.warmup_steps if t.warmup_steps is not None else DEFAULT_WARMUP_STEPS,
                             total_steps=steps.total_steps, hidden_size=hidden_size)
    more, schedule = resolve_optimizer(ds, source, run, steps.total_steps, on_cpu=not gpu[0],
                                       filled_by_auto=filled_by_auto)
    notes += more
    if "steps_per_print" not in ds:
        ds["steps_per_print"] = 1000000000  # our progress bar and TensorBoard report; keep DeepSpeed's log quiet
    if "tensorboard" in ds and ds["tensorboard"].get("enabled"):
        notes.append("DeepSpeed's own tensorboard monitor is on: it writes lr/timings under its own tags; "
                     "relbert-ds writes train/* and val/* to output_dir/tensorboard")
    return ResolvedDeepSpeed(ds, source, precision, batch, steps, stage, notes, schedule)


def skip_cpu_shm_op() -> None:
    """Do not JIT-compile DeepSpeed's shared-memory all-reduce op on CPU-only machines.

    It serves CPU inference collectives only, costs 40-70 s of compilation on a fresh machine,
    and gloo does the same job here. Set RELBERT_DS_KEEP_SHM_OP=1 to keep it.
    """
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get("RELBERT_DS_KEEP_SHM_OP") == "1":
        return
    module = importlib.import_module("deepspeed.comm.torch")  # `import ... as` binds the package attribute
    module.build_shm_op = lambda: None


def attach_deepspeed_comm() -> None:
    """Make DeepSpeed's comm layer wrap the process group we created (rank discovery is ours).

    Needed before ZeRO-3 model construction: ``zero.Init`` reads the world size from it.
    """
    import deepspeed

    skip_cpu_shm_op()
    if distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=distributed.backend(), auto_mpi_discovery=False)


@contextmanager
def model_construction_context(resolved: ResolvedDeepSpeed) -> Iterator[None]:
    """Under ZeRO-3, make ``from_pretrained`` build the backbone already partitioned.

    transformers checks for a live ``HfDeepSpeedConfig`` while loading; it must exist before the
    model is built (and it is only a weak global, so we hold it for the duration).
    """
    if resolved.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    attach_deepspeed_comm()
    holder = HfDeepSpeedConfig(resolved.config)
    try:
        yield
    finally:
        del holder  # transformers keeps a weakref; the partitioned model stays partitioned


@contextmanager
def partitioned_parameters(resolved: ResolvedDeepSpeed) -> Iterator[None]:
    """Under ZeRO-3, parameters created inside (the loss head's) are partitioned at creation and
    in the training dtype, like the backbone's; otherwise a no-op.

    ZeRO-3 keeps one flat buffer per dtype and asserts that every parameter has the engine's
    dtype: a head built in fp32 next to a bf16 backbone fails ``deepspeed.initialize``. Values are
    drawn from the caller's RNG state as without ZeRO (rank 0's copy is broadcast).
    """
    if resolved.zero_stage != 3:
        yield
        return
    import deepspeed

    attach_deepspeed_comm()
    with deepspeed.zero.Init(config_dict_or_path=resolved.config):
        yield


def step_engine(engine: Any) -> bool:
    """``engine.step()``; False when DeepSpeed skipped the update at an accumulation boundary.

    DeepSpeed skips the update of a step whose gradients overflowed (fp16 loss scaling, or a
    non-finite gradient norm under ZeRO 1/2) and then leaves the LR scheduler where it was, so the
    schedule would lag the optimizer-step counter by every skipped step (warm-up and decay
    stretched, the run ending above its final lr). The scheduler is moved on here instead: the
    schedule stays a function of the step counter, as the run's plan and its checkpoints state.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if not boundary or engine.was_step_applied():
        return True
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    return False


def engine_args() -> Any:
    """The ``args`` of ``deepspeed.initialize``: on a GPU, the device the process group chose.

    DeepSpeed otherwise calls ``set_device(LOCAL_RANK)``, which fails where each rank sees one GPU
    (srun --gpus-per-task=1, MPI wrappers): there the rank's GPU is cuda:0 whatever its local rank.
    None on CPU, where DeepSpeed's default is right (a negative device_rank would make it a world of 1).
    """
    import argparse

    import torch

    if not torch.cuda.is_available():
        return None
    return argparse.Namespace(device_rank=torch.cuda.current_device())


def initialize_engine(module: Any, resolved: ResolvedDeepSpeed) -> Any:
    """``deepspeed.initialize`` with the resolved config; returns the engine."""
    import deepspeed

    attach_deepspeed_comm()
    params = [p for p in module.parameters() if p.requires_grad]

    def initialize() -> Any:
        try:
            scheduler = None
            if resolved.schedule is not None:
                import torch

                schedule = resolved.schedule
                scheduler = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # noqa: E731
            engine, _, _, _ = deepspeed.initialize(args=engine_args(), model=module, model_parameters=params,
                                                   config=resolved.config, lr_scheduler=scheduler)
        except (AssertionError, ValueError) as exc:
            # DeepSpeed validates its JSON with assertions; surface them as config errors.
            # pydantic's report is several lines (the model, then the field and why): one line of them
            lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
            why = " / ".join(lines)[:400] if lines else repr(exc)
            raise ConfigError(f"DeepSpeed rejected {resolved.source}: {why}; fix: correct that setting (see "
                              f"ds_configs/ for working examples)") from exc
        return engine

    # Agreed: DeepSpeed checks its JSON on every rank alike, so a rejection is printed once (rank 0).
    return distributed.agree(initialize)
