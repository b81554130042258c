"""Real 2-rank training runs (tiny random BERT/Llama, CPU, gloo): resume reproduces the
uninterrupted run step for step, TensorBoard scalars read back, exported models load, ZeRO-3
partitions a decoder-only backbone and the export consolidates it."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.launch import check, deepspeed_cmd, run

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"
# 79 relations, 8 relations per step (over 2 ranks): 10 steps per epoch (the last one filled).
SMALL = ["--relations_per_step", "8", "--positives_per_relation", "4", "--negatives_per_relation", "4",
         "--analogy", "sat", "semeval2012", "--batch_size", "128", "--lr", "1e-4", "--warmup_steps", "2"]


def history(run_dir: Path, kind: str = "step") -> list[dict]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train(model: str, out: Path, *extra: str, config: str = "ds_configs/zero2.json", timeout: float = 300):
    return run(deepspeed_cmd(TRAIN, "--deepspeed_config", config, "--model", model, "--output_dir", str(out),
                             *SMALL, *extra), timeout=timeout)


@pytest.fixture(scope="module")
def full_run(tiny_bert, tmp_path_factory):
    """The uninterrupted reference: 2 epochs, checkpoint every 3 steps, keep the last 2."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = check(train(tiny_bert, out, "--epochs", "2", "--save_every_steps", "3", "--keep_last", "2"))
    return out, result


def test_full_run_outputs(full_run):
    out, result = full_run
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"output_dir"')))
    assert summary["optimizer_steps"] == 20 and summary["final_model"] == str(out / "model")
    steps = history(out)
    assert [r["optimizer_step"] for r in steps] == list(range(1, 21))
    assert all(np.isfinite(r["loss"]) and r["pairs_per_s"] > 0 and r["tokens_per_s"] > r["pairs_per_s"] for r in steps)
    # warm-up over 2 steps (the first already trains), then constant; logged: the lr each step used
    assert [r["lr"] for r in steps[:3]] == pytest.approx([5e-5, 1e-4, 1e-4])
    assert all(r["lr"] == pytest.approx(1e-4) for r in steps[2:])
    epochs = history(out, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert set(epochs[0]["analogy"]) == {"sat", "semeval2012"}
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["precision"] == "fp32"
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 8
    # keep_last 2: only the two newest complete checkpoints survive; latest names the newest
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["global_step18", "global_step20"], ckpts
    assert (out / "checkpoints" / "latest").read_text() == "global_step20"
    assert {p.name for p in (out / "checkpoints" / "global_step20").glob("rng_state_rank*.pt")} == \
        {"rng_state_rank0.pt", "rng_state_rank1.pt"}


def test_resume_reproduces_uninterrupted_losses(full_run, tiny_bert, tmp_path):
    reference, _ = full_run
    out = tmp_path / "run"
    # Stopped after step 7 (mid-epoch), then resumed from the latest checkpoint to the end.
    check(train(tiny_bert, out, "--epochs", "2", "--save_every_steps", "3", "--keep_last", "2", "--max_steps", "7"))
    assert (out / "checkpoints" / "latest").read_text() == "global_step7"
    resumed = check(train(tiny_bert, out, "--epochs", "2", "--save_every_steps", "3", "--keep_last", "2",
                          "--resume", "latest"))
    assert "resumed from" in resumed.stderr
    want = {r["optimizer_step"]: r["loss"] for r in history(reference)}
    got = {r["optimizer_step"]: r["loss"] for r in history(out)}
    assert sorted(got) == list(range(1, 21))
    diffs = [abs(got[s] - want[s]) for s in want]
    assert max(diffs) <= 1e-6, diffs
    # the optimizer really moved: losses change from step to step
    assert len({round(v, 6) for v in want.values()}) > 15


def test_tensorboard_scalars_read_back(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = full_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/pairs_per_s", "train/tokens_per_s",
                "train/peak_memory_mb", "train/pos_cos", "train/neg_cos", "train/retrieval_acc", "train/mfu",
                "val/analogy/sat", "val/analogy/semeval2012", "val/analogy_mean", "val/loss"):
        assert tag in tags, tag
    steps = history(out)
    for tag in ("loss", "lr", "grad_norm", "pos_cos", "retrieval_acc"):
        events = acc.Scalars(f"train/{tag}")
        assert [e.step for e in events] == [r["optimizer_step"] for r in steps]
        assert np.allclose([e.value for e in events], [r[tag] for r in steps], rtol=1e-6, atol=1e-7)
    epochs = history(out, "epoch")
    val = acc.Scalars("val/analogy/sat")
    assert [v.value for v in val] == pytest.approx([e["analogy"]["sat"] for e in epochs])
    # the projector: validation positives with relation and parent labels
    plugin = out / "tensorboard" / "projector_config.pbtxt"
    assert plugin.exists()
    metadata = next((out / "tensorboard").rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "relation\tparent" and len(metadata) == 1 + 158
    assert metadata[1].split("\t")[1] == metadata[1].split("\t")[0][:-1]  # "1a" -> parent "1"


def test_exported_model_loads(full_run):
    from transformers import AutoModel

    from relbert_ds import RelationEncoder
    from relbert_ds.model.prompts import TEMPLATES

    out, _ = full_run
    model = out / "model"
    enc = RelationEncoder.from_pretrained(str(model))
    assert enc.template == TEMPLATES["d"] and enc.pooling == "average_no_mask"
    plain = AutoModel.from_pretrained(str(model))
    # the export holds the trained weights, not the initial ones
    ckpt = torch.load(next((out / "checkpoints" / "global_step20").glob("*model_states.pt")), weights_only=False)
    trained = {k.removeprefix("encoder.backbone."): v for k, v in ckpt["module"].items()
               if k.startswith("encoder.backbone.")}
    exported = plain.state_dict()
    compared = [k for k in trained if k in exported]
    assert len(compared) == len(trained) > 20, sorted(set(trained) - set(exported))  # every trained weight
    assert all(torch.equal(exported[k], trained[k]) for k in compared)
    card = (model / "README.md").read_text()
    assert "## Training recipe" in card and "| loss | nce (temperature 0.05) |" in card
    assert "| global batch | 8 relation groups per optimizer step over 2 rank(s)" in card
    assert re.search(r"\| sat \| validation \| accuracy \| \d+\.\d \|", card), card
    training = json.loads((model / "relbert_ds_training.json").read_text())
    assert training["train"]["lr"] == 1e-4 and training["world_size"] == 2
    best = json.loads((out / "best_model" / "relbert_ds_training.json").read_text())
    assert best["best"]["epoch"] in (0, 1)
    vectors = enc.encode([("cat", "animal"), ("paris", "france")])
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()


def test_evaluator_reads_a_checkpoint_like_the_export(full_run, tiny_bert, tmp_path):
    """evaluate.py on <run>/checkpoints (the latest, ZeRO-2 shards) gives the vectors and the
    accuracy of the exported final model: the same trained weights by either way in."""
    out, _ = full_run
    results = {}
    for name, model in (("checkpoint", out / "checkpoints"), ("export", out / "model")):
        done = check(run([sys.executable, "launchers/evaluate.py", "--model", str(model), "--analogy", "sat",
                          "--classification", "none", "--split", "valid", "--vectors", str(tmp_path / f"{name}.npz"),
                          "--output", str(tmp_path / f"{name}.json")], timeout=300))
        assert "| sat" in done.stdout
        results[name] = (np.load(tmp_path / f"{name}.npz"), json.loads((tmp_path / f"{name}.json").read_text()))
    (ck_vec, ck_json), (ex_vec, ex_json) = results["checkpoint"], results["export"]
    assert (ck_vec["pairs"] == ex_vec["pairs"]).all() and len(ck_vec["pairs"]) > 100
    np.testing.assert_allclose(ck_vec["model_vectors"], ex_vec["model_vectors"], atol=1e-5)
    key = "analogy/sat/validation/accuracy"
    assert ck_json["models"]["model"]["metrics"][key] == ex_json["models"]["model"]["metrics"][key]
    assert ck_json["models"]["model"]["model"]["kind"] == "deepspeed_checkpoint"
    # and they are the trained weights: the untrained backbone gives other vectors for the same pairs
    from relbert_ds import RelationEncoder

    pairs = [tuple(p) for p in ck_vec["pairs"][:64]]
    untrained = RelationEncoder.from_pretrained(tiny_bert).encode(pairs)
    assert np.abs(untrained - ck_vec["model_vectors"][:64]).max() > 1e-3


def test_zero3_llama_partitions_and_export_consolidates(tiny_llama, tmp_path):
    """A decoder-only backbone under ZeRO-3 on 2 ranks; the exported weights equal a ZeRO-0 run's."""
    from relbert_ds import RelationEncoder

    opts = ["--template", "<subj> is to <obj> as", "--pooling", "last", "--max_steps", "3", "--epochs", "1",
            "--metric", "none", "--analogy", "--no-projector"]
    check(train(tiny_llama, tmp_path / "z3", *opts, config="ds_configs/zero3.json"))
    check(train(tiny_llama, tmp_path / "z0", *opts, config="ds_configs/zero0.json"))
    config = json.loads((tmp_path / "z3" / "config.json").read_text())
    assert config["resolved"]["zero_stage"] == 3
    a = RelationEncoder.from_pretrained(str(tmp_path / "z3" / "model"))
    b = RelationEncoder.from_pretrained(str(tmp_path / "z0" / "model"))
    start = RelationEncoder.from_pretrained(tiny_llama, template="<subj> is to <obj> as", pooling="last")
    sa, sb, s0 = a.backbone.state_dict(), b.backbone.state_dict(), start.backbone.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].numel() == s0[k].numel() for k in sa)  # nothing empty
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5
    assert max(float((sa[k] - s0[k]).abs().max()) for k in sa) > 1e-4  # it trained
    pairs = [("cat", "animal"), ("oak", "tree")]
    assert np.allclose(a.encode(pairs), b.encode(pairs), atol=1e-5)


def test_gradient_accumulation_and_early_stop(tiny_bert, tmp_path):
    """2 accumulation steps split each planned step of 8 relations into 2 micro steps of 4: an
    epoch is still 10 optimizer steps and sees all 79 relations (relbert-ds 0.1 dropped the filled
    tail micro step). With a learning rate too small to change any prediction, validation never
    improves and patience 1 stops after epoch 1."""
    config = tmp_path / "gas2.json"
    data = json.loads(Path("ds_configs/zero2.json").read_text())
    data["gradient_accumulation_steps"] = 2
    config.write_text(json.dumps(data))
    out = tmp_path / "run"
    result = check(train(tiny_bert, out, "--epochs", "4", "--lr", "1e-12", "--early_stop_patience", "1",
                         "--no-projector", config=str(config)))
    assert "early stop" in result.stderr
    steps, epochs = history(out), history(out, "epoch")
    assert [r["optimizer_step"] for r in steps] == list(range(1, 21))
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[1]["best_epoch"] == 0
    ds = json.loads((out / "ds_config.json").read_text())
    triad = (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"])
    assert triad == (8, 2, 2)


def test_recipe_in_steps_validates_every_n_steps(tiny_bert, tmp_path):
    """--max_steps alone states the run (epochs follow as needed), --eval_every_steps validates
    and selects every N steps; the whole epoch-less recipe on one process."""
    out = tmp_path / "run"
    done = check(run([sys.executable, TRAIN, "--model", tiny_bert, "--output_dir", str(out), *SMALL,
                      "--max_steps", "12", "--eval_every_steps", "5", "--no-projector", "--metric", "analogy"]))
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"output_dir"')))
    assert summary["optimizer_steps"] == 12  # beyond the 10 steps of one epoch
    steps, evals = history(out), history(out, "eval")
    assert [r["epoch"] for r in steps] == [0] * 10 + [1] * 2
    assert [(e["optimizer_step"], e["epoch"]) for e in evals] == [(5, 0), (10, 0), (12, 1)]
    best = max(evals, key=lambda e: (e["score"], -e["optimizer_step"]))
    assert summary["best_step"] == best["optimizer_step"] == evals[-1]["best_step"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["global_step10", "global_step12"]
