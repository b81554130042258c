"""Hugging Face-style "auto" values in DeepSpeed JSONs: the published example configs resolve to
the numbers the Hugging Face integration would put there, nothing "auto" is left but what the
engine resolves, DeepSpeed's own config parser reads the result, and an "auto" nobody fills is one
clear line."""
import copy
import json
from pathlib import Path

import pytest

from relbert_ds.errors import ConfigError
from relbert_ds.training.ds_auto import auto_options, resolve_hf_auto
from relbert_ds.training.engine import resolve_batch, resolve_precision

REPO = Path(__file__).resolve().parents[3]

# The "ZeRO-2 Example" and "ZeRO-3 Example" auto-configuration files of the Hugging Face
# Transformers DeepSpeed integration docs, https://huggingface.co/docs/transformers/main_classes/deepspeed
# (sections "ZeRO-2 Example" / "ZeRO-3 Example"; source: huggingface/transformers,
# docs/source/en/main_classes/deepspeed.md), written out as Python dicts.
HF_ZERO2_EXAMPLE = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
HF_ZERO3_EXAMPLE = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
# Same docs, "Scheduler" section: the WarmupDecayLR entry.
HF_WARMUP_DECAY = {"type": "WarmupDecayLR", "params": {"last_batch_iteration": -1, "total_num_steps": "auto",
                                                       "warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                       "warmup_num_steps": "auto"}}
ENGINE_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16.enabled",
               "bf16.enabled"}
OPTIONS = dict(lr=3e-4, betas=(0.8, 0.98), eps=1e-7, weight_decay=0.01, warmup_steps=7, total_steps=123,
               max_grad_norm=0.5)


def autos(node, path=""):
    """Dotted paths of the "auto" strings in a JSON tree (the test's own walk)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in autos(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in autos(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


def expected_common(example: dict, o: dict) -> dict:
    """What the Hugging Face Trainer would write for the optimizer, scheduler and clipping keys
    (trainer_config_process): learning rate, Adam betas/eps, weight decay, 0 as warm-up floor."""
    want = copy.deepcopy(example)
    want["optimizer"]["params"] = {"lr": o["lr"], "betas": list(o["betas"]), "eps": o["eps"],
                                   "weight_decay": o["weight_decay"]}
    want["scheduler"]["params"] = {"warmup_min_lr": 0, "warmup_max_lr": o["lr"], "warmup_num_steps": o["warmup_steps"]}
    want["gradient_clipping"] = o["max_grad_norm"]
    return want


def test_hf_zero2_example_resolves_to_the_trainer_values():
    ds = copy.deepcopy(HF_ZERO2_EXAMPLE)
    notes = resolve_hf_auto(ds, "hf_zero2.json", **OPTIONS, hidden_size=384)
    want = expected_common(HF_ZERO2_EXAMPLE, OPTIONS)
    assert ds == want  # every other key untouched; the explicit 2e8 bucket sizes stay 2e8
    assert ds["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert set(autos(ds)) == ENGINE_KEYS - {"bf16.enabled"}  # the docs' example has no bf16 section
    assert len(notes) == len(autos(HF_ZERO2_EXAMPLE)) - len(autos(ds)) == 8
    assert any(n.startswith("optimizer.params.lr: auto -> 0.0003") and "--lr" in n for n in notes)


@pytest.mark.parametrize("hidden", [32, 384, 768, 1024, 4096])
def test_hf_zero3_example_bucket_sizes_from_the_hidden_size(hidden):
    ds = copy.deepcopy(HF_ZERO3_EXAMPLE)
    notes = resolve_hf_auto(ds, "hf_zero3.json", **OPTIONS, hidden_size=hidden)
    want = expected_common(HF_ZERO3_EXAMPLE, OPTIONS)
    # The Hugging Face docs: reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2,
    # stage3_param_persistence_threshold = 10 hidden (integer arithmetic here, floats in the code).
    want["zero_optimization"].update(reduce_bucket_size=hidden ** 2, stage3_prefetch_bucket_size=9 * hidden ** 2 // 10,
                                     stage3_param_persistence_threshold=10 * hidden)
    assert ds == want
    z = ds["zero_optimization"]
    assert all(type(z[k]) is int for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                           "stage3_param_persistence_threshold"))
    assert set(autos(ds)) == ENGINE_KEYS - {"bf16.enabled"}
    assert len(notes) == 11


def test_defaults_fill_what_relbert_ds_would_use_and_zero_warmup_becomes_one():
    ds = copy.deepcopy(HF_ZERO2_EXAMPLE)
    resolve_hf_auto(ds, "x", lr=2e-5, warmup_steps=0, total_steps=10)
    assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert ds["gradient_clipping"] == 1.0
    # DeepSpeed refuses warmup_num_steps 0 (HF fills max(1, warmup) for the same reason)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 1


@pytest.mark.parametrize("scheduler,want", [
    (HF_WARMUP_DECAY, {"last_batch_iteration": -1, "total_num_steps": 123, "warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                       "warmup_num_steps": 7}),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                           "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01}},
     {"total_num_steps": 123, "warmup_num_steps": 7, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01}),
])
def test_warmup_scheduler_types(scheduler, want):
    ds = {"scheduler": copy.deepcopy(scheduler)}
    resolve_hf_auto(ds, "x", **OPTIONS)
    assert ds["scheduler"] == {"type": scheduler["type"], "params": want}


@pytest.mark.parametrize("ds,key", [
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "zero_optimization.allgather_bucket_size"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "auto"}}}, "scheduler.params.warmup_type"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_max_lr": "auto"}}}, "scheduler.params.warmup_max_lr"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": "auto"}}}, "scheduler.params.cycle_max_lr"),
    ({"amp": {"enabled": "auto", "opt_level": "auto"}}, "amp.enabled"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": ["auto", 0.999]}}}, "optimizer.params.betas[0]"),
])
def test_an_auto_nobody_fills_is_one_line_naming_the_key(ds, key):
    with pytest.raises(ConfigError) as info:
        resolve_hf_auto(ds, "my.json", **OPTIONS, hidden_size=64)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"my.json: {key} is \"auto\"")
    assert f"fix: set {key} to a value" in message


def test_bucket_size_auto_without_a_hidden_size_is_refused():
    with pytest.raises(ConfigError, match=r"reduce_bucket_size.*hidden size is unknown.*fix:"):
        resolve_hf_auto(copy.deepcopy(HF_ZERO3_EXAMPLE), "x", **OPTIONS, hidden_size=None)


def test_engine_keys_are_left_alone_and_nothing_else_is_touched():
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    before = copy.deepcopy(ds)
    assert resolve_hf_auto(ds, "x", **OPTIONS) == [] and ds == before


def test_auto_options_says_which_options_the_json_leaves_to_relbert_ds():
    assert auto_options(HF_ZERO2_EXAMPLE) == {"--lr", "--weight_decay", "--warmup_steps"}
    assert auto_options({"optimizer": {"params": {"lr": 1e-3, "weight_decay": "auto"}}}) == {"--weight_decay"}
    assert auto_options({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}) == {"--lr"}
    assert auto_options(json.loads((REPO / "ds_configs" / "zero2.json").read_text())) == set()


@pytest.mark.parametrize("example,stage", [(HF_ZERO2_EXAMPLE, 2), (HF_ZERO3_EXAMPLE, 3)])
def test_deepspeed_parses_the_resolved_examples(example, stage):
    """With the engine's batch and precision resolution after ours, DeepSpeed's own config class
    reads every value we filled (no process group needed at world size 1)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = copy.deepcopy(example)
    resolve_hf_auto(ds, "x", **OPTIONS, hidden_size=64)
    resolve_precision(ds, "x", (False, False, "no GPU"))
    resolve_batch(ds, "x", 4, 1)
    assert autos(ds) == []
    parsed = DeepSpeedConfig(copy.deepcopy(ds))
    assert parsed.zero_optimization_stage == stage and parsed.gradient_clipping == 0.5
    assert parsed.optimizer_params["lr"] == 3e-4 and parsed.scheduler_params["warmup_num_steps"] == 7
    assert parsed.train_batch_size == 4 and parsed.train_micro_batch_size_per_gpu == 4
    if stage == 3:
        assert (parsed.zero_config.reduce_bucket_size, parsed.zero_config.prefetch_bucket_size,
                parsed.zero_config.param_persistence_threshold) == (4096, 3686, 640)


@pytest.mark.parametrize("name,example", [("hf_zero2_auto.json", HF_ZERO2_EXAMPLE),
                                          ("hf_zero3_auto.json", HF_ZERO3_EXAMPLE)])
def test_shipped_hf_configs_are_the_docs_examples_plus_bf16_auto(name, example):
    shipped = json.loads((REPO / "ds_configs" / name).read_text())
    # bf16 "auto" added (as in transformers' own tests/deepspeed configs) so bf16 GPUs get bf16
    assert shipped == {**example, "bf16": {"enabled": "auto"}}


def test_hidden_size_of_backbone_configs():
    from transformers import BertConfig, GPT2Config, LlavaConfig, ResNetConfig

    from relbert_ds.training.ds_auto import hidden_size_of

    assert hidden_size_of(BertConfig(hidden_size=48, num_attention_heads=4)) == 48
    assert hidden_size_of(GPT2Config(n_embd=40)) == 40  # n_embd is GPT-2's hidden size
    assert hidden_size_of(ResNetConfig(hidden_sizes=[16, 64, 32, 8])) == 64
    llava = LlavaConfig(text_config={"model_type": "llama", "hidden_size": 72, "num_attention_heads": 4})
    assert hidden_size_of(llava) == 72
    assert hidden_size_of(object()) is None


# ---------------------------------------------------------------- through the engine's resolution

def _run(**train):
    from relbert_ds.training.config import RunConfig, TrainConfig

    return RunConfig(train=TrainConfig(**train))


def _resolve(ds: dict, tmp_path, run, hidden_size=64, world_size=2, steps_per_epoch=10):
    from relbert_ds.training.engine import resolve_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return resolve_deepspeed_config(str(path), run, world_size, steps_per_epoch, gpu=(False, False, "no GPU"),
                                    hidden_size=hidden_size)


def test_engine_fills_the_zero3_example_with_lr_and_warmup_given(tmp_path):
    """--lr and --warmup_steps next to an optimizer/scheduler section are allowed when the section
    says "auto" for them (the Hugging Face meaning); DeepSpeed then builds the JSON's scheduler."""
    ds = copy.deepcopy(HF_ZERO3_EXAMPLE)
    ds["scheduler"] = copy.deepcopy(HF_WARMUP_DECAY)
    r = _resolve(ds, tmp_path, _run(lr=1e-4, warmup_steps=5, max_steps=20))
    c = r.config
    assert autos(c) == [] and r.schedule is None  # the JSON's WarmupDecayLR rules, not ours
    assert c["optimizer"]["params"]["lr"] == 1e-4 and c["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert c["scheduler"]["params"] == {"last_batch_iteration": -1, "total_num_steps": 20, "warmup_min_lr": 0,
                                        "warmup_max_lr": 1e-4, "warmup_num_steps": 5}
    assert (c["zero_optimization"]["reduce_bucket_size"], c["zero_optimization"]["stage3_prefetch_bucket_size"],
            c["zero_optimization"]["stage3_param_persistence_threshold"]) == (64 * 64, 9 * 64 * 64 // 10, 640)
    assert "optimizer.params.lr: auto -> 0.0001 (--lr)" in r.notes


def test_engine_defaults_fill_auto_when_no_option_is_given(tmp_path):
    r = _resolve(copy.deepcopy(HF_ZERO2_EXAMPLE), tmp_path, _run(epochs=3))
    assert r.config["optimizer"]["params"]["lr"] == 2e-5  # relbert-ds's default, not HF's 5e-5
    assert r.config["scheduler"]["params"]["warmup_num_steps"] == 10


@pytest.mark.parametrize("ds,option,match", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, {"lr": 1e-4}, "--lr given while"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100, "warmup_max_lr": "auto"}}},
     {"warmup_steps": 5}, "--warmup_steps given while"),
    (HF_ZERO2_EXAMPLE, {"lr_schedule": "linear"}, "--lr_schedule given while"),
])
def test_engine_still_refuses_an_option_next_to_a_number(ds, option, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _resolve(copy.deepcopy(ds), tmp_path, _run(**option))


def test_engine_refuses_bucket_size_auto_without_the_backbone(tmp_path):
    with pytest.raises(ConfigError, match="hidden size is unknown"):
        _resolve(copy.deepcopy(HF_ZERO3_EXAMPLE), tmp_path, _run(), hidden_size=None)
