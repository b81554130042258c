"""DeepSpeed JSON resolution: precision, batch triad, optimizer/scheduler ownership, schedule."""
import json
import os
import subprocess
import sys

import pytest

from relbert_ds.errors import ConfigError
from relbert_ds.training.config import RunConfig
from relbert_ds.training.engine import (
    EMBEDDED_DS_CONFIG,
    WarmupSchedule,
    resolve_batch,
    resolve_deepspeed_config,
    resolve_precision,
)
from tests.launch import REPO, free_port

CPU = (False, False, "no GPU")
H100 = (True, True, "NVIDIA H100")
V100 = (True, False, "Tesla V100")


def write(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_embedded_default_is_zero2_json():
    assert json.loads((REPO / "ds_configs" / "zero2.json").read_text()) == EMBEDDED_DS_CONFIG


@pytest.mark.parametrize("name,stage", [("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_configs_resolve(name, stage):
    r = resolve_deepspeed_config(str(REPO / "ds_configs" / f"{name}.json"), RunConfig(), 2, 10, gpu=CPU)
    assert r.zero_stage == stage and r.precision == "fp32"


@pytest.mark.parametrize("gpu,expected", [(CPU, "fp32"), (H100, "bf16"), (V100, "fp16")])
def test_auto_precision(gpu, expected):
    ds = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    precision, why = resolve_precision(ds, "x", gpu)
    assert precision == expected and "auto" in why
    assert ds["bf16"]["enabled"] == (expected == "bf16") and ds["fp16"]["enabled"] == (expected == "fp16")


def test_precision_errors():
    with pytest.raises(ConfigError, match="fp16, which needs a GPU"):
        resolve_precision({"fp16": {"enabled": True}}, "ds.json", CPU)
    with pytest.raises(ConfigError, match="both bf16 and fp16"):
        resolve_precision({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "ds.json", H100)
    with pytest.raises(ConfigError, match="does not support it"):
        resolve_precision({"bf16": {"enabled": True}}, "ds.json", V100)
    precision, why = resolve_precision({"bf16": {"enabled": True}}, "ds.json", CPU)
    # An explicit bf16 on CPU is honoured, and the reason says why "auto" would not have picked it.
    assert precision == "bf16" and "AMX" in why and '"auto" runs fp32' in why


def test_global_batch_resolution():
    ds = {}
    plan = resolve_batch(ds, "x", None, 4)
    assert (plan.relations_per_step, plan.accumulation) == (16, 1)  # the default global batch
    triad = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert triad == (4, 1, 16)
    # train_batch_size is global, like --relations_per_step: the world size does not change it
    for world in (1, 2, 3, 8):
        ds = {"train_batch_size": 64, "gradient_accumulation_steps": 2}
        plan = resolve_batch(ds, "x", None, world)
        assert (plan.relations_per_step, plan.accumulation) == (64, 2)
        micro, accum, total = plan.deepspeed_triad
        assert micro * accum * world == total  # what DeepSpeed asserts
        assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (micro, total)
    assert resolve_batch({"train_batch_size": "auto"}, "x", 48, 4).relations_per_step == 48
    assert resolve_batch({"train_batch_size": 48}, "x", 48, 4).relations_per_step == 48
    with pytest.raises(ConfigError, match="--relations_per_step 32 and train_batch_size 48 in ds.json disagree"):
        resolve_batch({"train_batch_size": 48}, "ds.json", 32, 4)
    # per-rank spellings still work, with a note that the batch then depends on the world size
    legacy = resolve_batch({}, "x", None, 2, relations_per_rank=4)
    assert legacy.relations_per_step == 8 and "deprecated" in legacy.notes[0]
    per_gpu = resolve_batch({"train_micro_batch_size_per_gpu": 4}, "ds.json", None, 2)
    assert per_gpu.relations_per_step == 8 and "grows with the world size" in per_gpu.notes[0]
    with pytest.raises(ConfigError, match="disagree"):
        resolve_batch({"train_micro_batch_size_per_gpu": 4}, "ds.json", None, 2, relations_per_rank=8)
    with pytest.raises(ConfigError, match="both given"):
        resolve_batch({}, "ds.json", 16, 2, relations_per_rank=8)
    with pytest.raises(ConfigError, match=r"train_batch_size 50 != train_micro_batch_size_per_gpu 8 x 1"):
        resolve_batch({"train_batch_size": 50, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1},
                      "ds.json", None, 2)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_batch({"gradient_accumulation_steps": 0}, "ds.json", None, 2)


def test_schedule_and_loop_count_the_same_steps():
    # relbert-ds 0.1 sized a linear schedule for micro_steps * epochs // accumulation but its loop
    # dropped micro_steps % accumulation per epoch: 5 micro steps, accumulation 2, 10 epochs ->
    # schedule 25, run 20, final lr 40% of peak. Now the sampler plans optimizer steps, and one
    # StepPlan sizes both.
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.training.sampler import RelationAwareSampler
    from relbert_ds.training.schedule import plan_steps

    run = RunConfig()
    run.train.lr_schedule, run.train.epochs = "linear", 10
    run.data.relations_per_step = 16
    sampler = RelationAwareSampler(load_relation_dataset("semeval2012", "train"), world_size=2, rank=0,
                                   relations_per_step=16, accumulation=2)
    r = resolve_deepspeed_config(None, run, 2, sampler.steps_per_epoch, gpu=CPU)
    assert r.steps == plan_steps(sampler.steps_per_epoch, 10, None)
    assert r.schedule.total_steps == r.steps.total_steps == 5 * 10
    assert r.schedule(r.steps.total_steps - 1) > 0 and r.schedule(r.steps.total_steps) == 0.0  # decays at the end
    assert plan_steps(5, None, 7).total_steps == 7  # --max_steps alone: exactly that many
    assert plan_steps(5, 2, 70).total_steps == 10  # both: the earlier end
    assert plan_steps(5).total_steps == 50 and plan_steps(5, None, 7).total_steps == 7


def test_optimizer_from_options_or_json_never_both(tmp_path):
    run = RunConfig()
    r = resolve_deepspeed_config(None, run, 1, 10, gpu=CPU)
    assert r.config["optimizer"]["type"] == "AdamW" and r.config["optimizer"]["params"]["lr"] == 2e-5
    assert r.config["optimizer"]["params"]["torch_adam"] is True  # CPU: no JIT-compiled Adam
    assert "scheduler" not in r.config and r.schedule == WarmupSchedule(10, "constant", 100)
    on_gpu = resolve_deepspeed_config(None, run, 1, 10, gpu=H100)
    # GPU: torch's fused AdamW, nothing compiled (DeepSpeed's FusedAdam is a JIT build)
    assert on_gpu.config["optimizer"]["params"]["torch_adam"] is True
    assert on_gpu.config["optimizer"]["params"]["fused"] is True
    path = write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}})
    r = resolve_deepspeed_config(path, run, 1, 10, gpu=CPU)
    assert r.config["optimizer"]["params"]["lr"] == 1e-3 and r.schedule is None
    run.train.lr = 5e-6
    with pytest.raises(ConfigError, match="--lr given while .* has an optimizer section"):
        resolve_deepspeed_config(path, run, 1, 10, gpu=CPU)
    run.train.lr, run.train.warmup_steps = None, 3
    with pytest.raises(ConfigError, match="--warmup_steps given while .* has a scheduler section"):
        resolve_deepspeed_config(path, run, 1, 10, gpu=CPU)


def test_warmup_schedule_factors():
    constant = WarmupSchedule(4, "constant", 10)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    linear = WarmupSchedule(2, "linear", 6)
    assert [linear(s) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert WarmupSchedule(0, "constant", 5)(0) == 1.0
    run = RunConfig()
    run.train.lr_schedule, run.train.epochs = "linear", 3
    r = resolve_deepspeed_config(None, run, 2, 5, gpu=CPU)
    assert r.schedule.total_steps == 15  # 5 optimizer steps per epoch x 3 epochs


def test_bad_json_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ConfigError, match=r"bad.json, line 1: not valid JSON"):
        resolve_deepspeed_config(str(bad), RunConfig(), 1, gpu=CPU)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_deepspeed_config(str(tmp_path / "missing.json"), RunConfig(), 1, gpu=CPU)
    with pytest.raises(ConfigError, match="stage is 5"):
        resolve_deepspeed_config(write(tmp_path, {"zero_optimization": {"stage": 5}}), RunConfig(), 1, gpu=CPU)


def test_run_config_validation_and_round_trip():
    from relbert_ds.training.config import build_train_parser, run_config_from_args

    args = build_train_parser().parse_args(["--loss", "triplet", "--analogy", "sat", "--no-tensorboard",
                                            "--relations_per_step", "4", "--local_rank=1"])
    run = run_config_from_args(args).validate()
    assert (run.train.loss, run.validation.analogy, run.train.tensorboard, run.data.relations_per_step) == \
        ("triplet", ["sat"], False, 4)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    for field, value, message in (("loss", "mse", "--loss 'mse' is not one of"),
                                  ("epochs", 0, "--epochs is 0"), ("temperature", 0.0, "must be a number > 0"),
                                  ("margin", -1.0, "--margin must be a number >= 0")):
        bad = RunConfig()
        setattr(bad.train, field, value)
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    bad = RunConfig()
    bad.data.positives_per_relation = 1
    with pytest.raises(ConfigError, match="--positives_per_relation must be an integer >= 2"):
        bad.validate()
    bad = RunConfig()
    bad.model.template = "<subj> only"
    with pytest.raises(ConfigError, match="no <obj>"):
        bad.validate()


def test_config_replay_and_deepspeed_alias(tmp_path):
    import yaml

    from relbert_ds.training.config import parse_train_command

    first = parse_train_command(["--loss", "triplet", "--relations_per_step", "24", "--lr", "1e-4",
                                 "--analogy", "sat", "--deepspeed", "ds_configs/zero3.json"]).run
    assert first.deepspeed_config == "ds_configs/zero3.json"  # Hugging Face's spelling of --deepspeed_config
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**first.to_dict(), "resolved": {"world_size": 2}}))
    replay = parse_train_command(["--config", str(saved)]).run
    assert replay == first
    # options on the command line win over the file
    changed = parse_train_command(["--config", str(saved), "--lr", "5e-6", "--relations_per_step", "8"]).run
    assert (changed.train.lr, changed.data.relations_per_step, changed.train.loss) == (5e-6, 8, "triplet")
    as_yaml = tmp_path / "run.yaml"
    as_yaml.write_text(yaml.safe_dump({"train": {"loss": "iloob", "max_steps": 3},
                                       "data": {"train_data": "semeval2012"}}))
    from_yaml = parse_train_command(["--config", str(as_yaml)]).run
    assert (from_yaml.train.loss, from_yaml.train.max_steps, from_yaml.data.train_data) == ("iloob", 3, ["semeval2012"])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        parse_train_command(["--config", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_train_command(["--config", str(tmp_path / "none.json")])
    with pytest.raises(ConfigError, match="two configs"):
        parse_train_command(["--deepspeed", "a.json", "--deepspeed_config", "b.json"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus; fix: see relbert-ds-train --help"):
        parse_train_command(["--bogus"])
    assert parse_train_command(["--deepspeed"]).run.deepspeed_config is None  # DeepSpeed's own bare flag


def test_hf_auto_config_resolves_through_the_engine():
    path = str(REPO / "ds_configs" / "hf_zero3_auto.json")
    run = RunConfig()
    run.train.lr = 1e-4  # fills the JSON's "lr": "auto": not a second source of the learning rate
    r = resolve_deepspeed_config(path, run, 2, 5, gpu=CPU, hidden_size=384)
    assert r.config["optimizer"]["params"]["lr"] == 1e-4
    assert r.config["zero_optimization"]["reduce_bucket_size"] == 384 * 384
    assert "auto" not in json.dumps(r.config)


def test_gpu_optimizer_kernel_needs_no_compiler(monkeypatch, tmp_path):
    run = RunConfig()
    offload = str(REPO / "ds_configs" / "zero3_offload.json")
    for path in (None, offload):  # plain ZeRO-2, and ZeRO-3 with optimizer states on the host
        r = resolve_deepspeed_config(path, run, 1, 10, gpu=H100)
        params = r.config["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True
        assert r.config["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed insists on its cpu_adam
        assert any("torch's fused AdamW" in n for n in r.notes)
    # DeepSpeed's kernel asked for, with no compiler and no prebuilt op: one line naming both fixes
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    asked = write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": False}}})
    with pytest.raises(ConfigError, match=r"must be compiled \(fused_adam\) and nvcc .* is missing here; fix: "
                                          r"remove \"torch_adam\": false .* DS_BUILD_FUSED_ADAM=1") as err:
        resolve_deepspeed_config(asked, run, 1, 10, gpu=H100)
    assert "\n" not in str(err.value)
    # NVMe offload swaps optimizer states with DeepSpeed's cpu_adam only: left alone
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    nvme = resolve_deepspeed_config(write(tmp_path, ds, "nvme.json"), run, 1, 10, gpu=H100)
    assert "torch_adam" not in nvme.config["optimizer"]["params"]


def _run_one_rank(script, *args, cwd):
    """Run ``script`` as rank 0 of a one-rank job (DeepSpeed initializes the process group itself)."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                            timeout=240, cwd=str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_gpu_resolved_optimizer_builds_in_real_deepspeed_without_compiling(tmp_path):
    # The config resolved for a GPU, handed to the real deepspeed.initialize (here on CPU, where
    # torch's fused AdamW runs too): DeepSpeed must build torch's AdamW with fused=True and build
    # none of its own ops, for ZeRO-2 and for ZeRO-3 with offloaded optimizer states.
    script = tmp_path / "init.py"
    script.write_text("""
import json, sys, torch, deepspeed
from relbert_ds.training.config import RunConfig
from relbert_ds.training.engine import resolve_deepspeed_config, skip_cpu_shm_op
skip_cpu_shm_op()
out = {}
for path in (None, sys.argv[1]):
    r = resolve_deepspeed_config(path, RunConfig(), 1, 10, gpu=(True, True, "NVIDIA H100"))
    r.config["bf16"]["enabled"] = False  # the CPU part of this check: the optimizer, not the precision
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=r.config)
    opt = engine.basic_optimizer
    out[str(path)] = [type(opt).__module__ + "." + type(opt).__name__, opt.defaults.get("fused")]
from deepspeed.ops.op_builder.builder import OpBuilder
print(json.dumps({"optimizers": out, "ops_loaded": sorted(getattr(OpBuilder, "_loaded_ops", {}) or {})}))
""")
    result = _run_one_rank(script, str(REPO / "ds_configs" / "zero3_offload.json"), cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(report["optimizers"].values()) == [["torch.optim.adamw.AdamW", True]] * 2, report
    assert "Building extension" not in result.stderr and "ninja" not in result.stderr.lower()


@pytest.mark.parametrize("major,native", [(7, False), (8, True), (9, True)])
def test_bf16_counts_only_native_support_of_the_real_torch_api(monkeypatch, major, native):
    # torch.cuda.is_bf16_supported() itself runs, on a GPU described at the driver level: a V100/T4
    # (compute capability 7.x) emulates bf16 and torch's default answer there is True.
    import types

    import torch

    from relbert_ds.training.engine import _gpu_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"GPU sm_{major}0")
    monkeypatch.setattr(torch.version, "hip", None)
    assert torch.cuda.is_bf16_supported() is True  # what the old check read
    gpu = _gpu_info()
    assert gpu == (True, native, f"GPU sm_{major}0")
    ds = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    assert resolve_precision(ds, "x", gpu)[0] == ("bf16" if native else "fp16")


def test_a_skipped_update_moves_the_schedule_on_with_the_step_counter(tmp_path):
    # A real DeepSpeed ZeRO-2 engine and a real non-finite gradient: DeepSpeed skips that update and,
    # by itself, leaves the LR scheduler behind; step_engine keeps it on the step counter.
    script = tmp_path / "skip.py"
    script.write_text("""
import json, torch, deepspeed
from relbert_ds.training.config import RunConfig
from relbert_ds.training.engine import resolve_deepspeed_config, skip_cpu_shm_op, step_engine
skip_cpu_shm_op()
r = resolve_deepspeed_config(None, RunConfig(), 1, 10, gpu=(False, False, "no GPU"))
model = torch.nn.Linear(4, 1)
schedule = r.schedule
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=r.config,
                                  lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
applied, lrs = [], []
for step, scale in enumerate([1.0, float("inf"), 1.0]):
    loss = model(torch.ones(2, 4)).sum() * scale
    engine.backward(loss)
    lrs.append(engine.get_lr()[0])
    applied.append(step_engine(engine))
expected = [2e-5 * schedule(i) for i in range(3)]
print(json.dumps({"applied": applied, "lrs": lrs, "skipped": engine.skipped_steps,
                  "scheduler_steps": engine.lr_scheduler.last_epoch, "expected": expected}))
""")
    report = json.loads(_run_one_rank(script, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert report["applied"] == [True, False, True] and report["skipped"] == 1
    assert report["scheduler_steps"] == 3  # one per optimizer step, the skipped one too
    assert report["lrs"] == pytest.approx(report["expected"])  # each step used the lr of its step number
    assert len(set(report["lrs"])) == 3  # warm-up: the lr changes every step, so a lag would show


def test_deepspeed_gets_the_gpu_the_process_group_chose(monkeypatch):
    # One GPU per rank (srun --gpus-per-task=1): local rank 3 runs on cuda:0, which DeepSpeed must use
    # instead of its default set_device(LOCAL_RANK). DeepSpeed reads args.device_rank (engine.py,
    # _set_distributed_vars); on CPU no args at all (device_rank -1 would make it a world of one).
    import torch

    from relbert_ds.training.engine import engine_args

    assert engine_args() is None
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert engine_args().device_rank == 0
    import inspect

    import deepspeed.runtime.engine as ds_engine

    assert "args.device_rank" in inspect.getsource(ds_engine.DeepSpeedEngine._set_distributed_vars)


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
def test_the_default_batch_notes_the_old_per_rank_default(world):
    # Before the world-size-invariant batch the default was 8 relations per rank: an unchanged
    # command on more than two ranks now trains on 16 relations instead of 8 x world, and says so.
    plan = resolve_batch({}, "zero2.json", None, world)
    old = [n for n in plan.notes if "8 per rank" in n]
    assert plan.relations_per_step == 16
    if world > 2:
        assert old == [f"the default global batch is 16 relations per step over all {world} ranks (relbert-ds "
                       f"before the world-size-invariant batch used 8 per rank: {8 * world} here); for the old "
                       f"batch pass --relations_per_step {8 * world}"]
        assert resolve_batch({}, "zero2.json", 8 * world, world).relations_per_step == 8 * world
    else:
        assert old == []
    # any batch the user chose, globally or per rank, gets no such note
    for ds, per_step, per_rank in (({}, 16, None), ({"train_batch_size": 32}, None, None),
                                   ({"train_batch_size": "auto"}, 24, None), ({}, None, 8),
                                   ({"train_micro_batch_size_per_gpu": 2}, None, None)):
        chosen = resolve_batch(ds, "zero2.json", per_step, world, relations_per_rank=per_rank)
        assert not [n for n in chosen.notes if "default global batch" in n]
