"""DeepSpeed JSON resolution: precision, batch triad, optimizer/scheduler ownership, schedule."""
import json

import pytest

from relbert_ds.config import RunConfig
from relbert_ds.engine import (EMBEDDED_DS_CONFIG, WarmupSchedule, resolve_batch, resolve_deepspeed_config,
                               resolve_precision)
from relbert_ds.errors import ConfigError
from tests.launch import REPO

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
    assert r.offload == (name == "zero3_offload")


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
    assert precision == "bf16" and "slower" in why


def test_batch_triad_derived_and_checked():
    ds = {}
    assert resolve_batch(ds, "x", None, 4) == (8, 1) and ds["train_batch_size"] == 32
    ds = {"train_batch_size": 64, "gradient_accumulation_steps": 2}
    assert resolve_batch(ds, "x", None, 4) == (8, 2)
    ds = {"train_batch_size": 48}
    assert resolve_batch(ds, "x", 6, 4) == (6, 2)
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
    assert resolve_batch(ds, "x", 3, 2) == (3, 1) and ds["train_batch_size"] == 6
    with pytest.raises(ConfigError, match=r"train_batch_size 50 != 8 relation groups per rank x 1 .* set train_batch_size to 16"):
        resolve_batch({"train_batch_size": 50, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1},
                      "ds.json", None, 2)
    # the micro batch is derived when only the total and accumulation are given
    assert resolve_batch({"train_batch_size": 50, "gradient_accumulation_steps": 1}, "x", None, 2) == (25, 1)
    with pytest.raises(ConfigError, match="disagree"):
        resolve_batch({"train_micro_batch_size_per_gpu": 4}, "ds.json", 8, 2)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_batch({"gradient_accumulation_steps": 0}, "ds.json", None, 2)


def test_optimizer_from_options_or_json_never_both(tmp_path):
    run = RunConfig()
    r = resolve_deepspeed_config(None, run, 1, 10, gpu=CPU)
    assert r.config["optimizer"]["type"] == "AdamW" and r.config["optimizer"]["params"]["lr"] == 2e-5
    assert r.config["optimizer"]["params"]["torch_adam"] is True  # CPU: no JIT-compiled Adam
    assert "scheduler" not in r.config and r.schedule == WarmupSchedule(10, "constant", 100)
    on_gpu = resolve_deepspeed_config(None, run, 1, 10, gpu=H100)
    assert "torch_adam" not in on_gpu.config["optimizer"]["params"]
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
    assert r.schedule.total_steps == 15  # 5 micro steps x 3 epochs / 1 accumulation step


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
    from relbert_ds.config import build_train_parser, run_config_from_args

    args = build_train_parser().parse_args(["--loss", "triplet", "--analogy", "sat", "--no-tensorboard",
                                            "--relations_per_rank", "4", "--local_rank=1"])
    run = run_config_from_args(args).validate()
    assert (run.train.loss, run.validation.analogy, run.train.tensorboard, run.data.relations_per_rank) == \
        ("triplet", ["sat"], False, 4)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    for field, value, message in (("loss", "mse", "--loss 'mse' is not one of"),
                                  ("epochs", 0, "--epochs is 0"), ("temperature", 0.0, "must be > 0")):
        bad = RunConfig()
        setattr(bad.train, field, value)
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    bad = RunConfig()
    bad.data.positives_per_relation = 1
    with pytest.raises(ConfigError, match="--positives_per_relation is 1"):
        bad.validate()
    bad = RunConfig()
    bad.model.template = "<subj> only"
    with pytest.raises(ConfigError, match="no <obj>"):
        bad.validate()
