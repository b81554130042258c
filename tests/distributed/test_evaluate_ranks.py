"""The evaluator CLI really launched: 1 rank (plain python) and 2 ranks (torchrun) give identical
predictions and metrics; bad input stops every rank with one ``error:`` line and no hang.

Small on purpose (bundled backbone, SAT's validation questions, two 3-label slices of bundled BLESS, one mapping
problem): about 40-60 s per probe on a 2-core CPU, mostly process start-up and imports. With the torch probe the
two classification sets are trained one per rank on 2 ranks (and both on the one rank of the plain run), so the
test covers the all-gather of finished results; with the sklearn probe the configurations are split instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import launch
from tests.assertions import assert_one_error_line

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launchers" / "evaluate.py"
BIN = Path(sys.executable).parent
DATA = ROOT / "relbert_ds" / "resources" / "data"
BLESS = DATA / "classification" / "BLESS"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return launch.run(cmd, timeout=timeout, env=_env(), cwd=str(ROOT))


def _torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n), str(LAUNCHER)]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_data")
    for name, labels in (("bless_small", ("coord", "hyper", "mero")), ("bless_other", ("event", "attri", "random"))):
        cls = root / name
        cls.mkdir()
        for split, per_label in (("train", 16), ("validation", 4), ("test", 6)):
            rows = [json.loads(line) for line in (BLESS / f"{split}.jsonl").read_text().splitlines() if line.strip()]
            keep = [r for label in labels for r in [r for r in rows if r["relation"] == label][:per_label]]
            (cls / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    # SAT's 37 validation questions, served as the test split of a local folder (one --split for all).
    sat = root / "sat_valid"
    sat.mkdir()
    (sat / "test.jsonl").write_text((DATA / "analogy" / "sat" / "valid.jsonl").read_text())
    mapping = root / "mapping.jsonl"
    mapping.write_text(json.dumps({"source": ["sun", "planet", "gravity", "orbit"],
                                   "target": ["nucleus", "electron", "charge", "shell"]}) + "\n")
    return {"root": root, "analogy": str(sat), "classification": [str(root / "bless_small"), str(root / "bless_other")],
            "mapping": str(mapping)}


def _args(data: dict, out: Path, probe: str) -> list[str]:
    return ["--model", "all-MiniLM-L6-v2", "--analogy", data["analogy"], "--split", "test", "--probe", probe,
            "--classification", *data["classification"], "--mapping", data["mapping"], "--max_iter", "60",
            "--batch_size", "16", "--threads", "1", "--output", str(out / "results.json"),
            "--predictions", str(out / "predictions.jsonl"), "--vectors", str(out / "vectors.npz")]


def _comparable(doc: dict) -> dict:
    model = dict(doc["models"]["model"])
    for key in ("timing", "world_size"):
        model.pop(key)
    for entry in model["classification"].values():
        entry.pop("time_s")
        entry.pop("device", None)
    return model


@pytest.mark.parametrize("probe", ["torch", "sklearn"])
def test_one_and_two_ranks_give_identical_results(small_data, tmp_path, probe):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run([sys.executable, str(LAUNCHER)] + _args(small_data, one, probe))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run(_torchrun(2) + _args(small_data, two, probe))
    assert r2.returncode == 0, r2.stderr[-3000:]
    d1 = json.loads((one / "results.json").read_text())
    d2 = json.loads((two / "results.json").read_text())
    assert (d1["world_size"], d2["world_size"]) == (1, 2)
    assert d2["models"]["model"]["world_size"] == 2
    # Every metric, every chosen configuration and grid score, bit for bit.
    assert _comparable(d1) == _comparable(d2)
    assert d1["models"]["model"]["metrics"] == d2["models"]["model"]["metrics"]
    # The vector tables are bit-identical: each pair was encoded in the same batch either way.
    v1, v2 = np.load(one / "vectors.npz"), np.load(two / "vectors.npz")
    assert (v1["pairs"] == v2["pairs"]).all() and v1["model_vectors"].shape == (len(v1["pairs"]), 384)
    assert np.array_equal(v1["model_vectors"], v2["model_vectors"])
    # Per-question predictions, cosine scores included, are identical too.
    p1 = (one / "predictions.jsonl").read_text()
    assert p1 == (two / "predictions.jsonl").read_text()
    records = [json.loads(line) for line in p1.splitlines()]
    assert sum(r["task"] == "analogy" for r in records) == 37
    assert sum(r["task"] == "classification" for r in records) == 36
    assert {r["dataset"] for r in records if r["task"] == "classification"} == {"bless_small", "bless_other"}
    entries = d1["models"]["model"]["classification"]
    assert set(entries) == {"bless_small/test", "bless_other/test"}
    for entry in entries.values():
        assert entry["selected_on"] == "validation" and len(entry["grid"]) == 9 and entry["probe"] == probe
    assert d2["models"]["model"]["probe"]["implementation"] == probe
    # The torch probes ran from the ranks' shared queue while the analogy-only pairs were encoded (each probe
    # and each batch taken by one rank); the sklearn grid is sharded by configuration after the encoding.
    timings = [d["models"]["model"]["timing"] for d in (d1, d2)]
    if probe == "torch":
        one, two = (t["shared_queue"] for t in timings)
        assert len(one) == 1 and len(two) == 2
        assert one[0]["jobs"] == sum(s["jobs"] for s in two) == 2
        assert one[0]["batches"] == sum(s["batches"] for s in two) > 0
    else:
        assert not any("shared_queue" in t for t in timings)
    # The classification pairs (both directions, every split) were encoded first, on their own.
    rows = [json.loads(line) for folder in small_data["classification"] for split in ("train", "validation", "test")
            for line in (Path(folder) / f"{split}.jsonl").read_text().splitlines()]
    first = {q for r in rows for q in ((r["head"], r["tail"]), (r["tail"], r["head"]))}
    assert [t["first_pairs"] for t in timings] == [len(first)] * 2
    assert {d["dataset"] for d in d1["datasets"]} == {"sat_valid", "bless_small", "bless_other", "mapping"}
    # The table is printed once (rank 0), the other rank stays quiet.
    assert r2.stdout.count("| task | dataset |") == 1
    assert "| analogy | sat_valid | test | accuracy | 37 |" in r2.stdout


def test_bad_input_one_error_line_every_rank_exits(tmp_path):
    bad = tmp_path / "bad_analogy"
    bad.mkdir()
    good = {"stem": ["a", "b"], "choice": [["c", "d"], ["e", "f"]], "answer": 0}
    (bad / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": 7}) + "\n")
    r = run(_torchrun(2) + ["--model", "all-MiniLM-L6-v2", "--analogy", str(bad), "--classification", "none"],
            timeout=90)
    assert r.returncode != 0
    assert_one_error_line(r.stdout + r.stderr, "line 2: answer index 7 is out of range for 2 choices",
                          launcher="torchrun")
    assert "| task |" not in r.stdout  # nothing was evaluated


def test_a_model_with_nan_weights_stops_every_rank_with_one_line(tiny_bert, tmp_path):
    # A diverged model's vectors are nan on every rank: one message (rank 0), not one per rank, and no
    # rank left waiting in the gather of the vectors.
    import torch
    from transformers import AutoModel, AutoTokenizer

    broken = tmp_path / "nan_model"
    model = AutoModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.fill_(float("nan"))
    model.save_pretrained(str(broken))
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(str(broken))
    r = run(_torchrun(2) + ["--model", str(broken), "--analogy", "sat", "--classification", "none"], timeout=120)
    assert r.returncode != 0
    assert_one_error_line(r.stdout + r.stderr, f"{broken} gives non-finite relation vectors (nan or inf)",
                          launcher="torchrun")


def test_evaluators_sharing_one_cache_directory_all_finish_alike_and_leave_one_file(tiny_bert, tmp_path):
    """Three evaluators started together on one --cache_dir (a user's second job on the same model, say):
    every one finishes with the same numbers, the cache holds one complete table and no temporary file
    (each writes under a name of its own and renames: the last rename wins, with the same bytes), and a
    fourth run reads it instead of encoding."""
    cache = tmp_path / "cache"
    outs = [tmp_path / f"r{i}.json" for i in range(4)]

    def cmd(out: Path) -> list[str]:
        return [sys.executable, str(LAUNCHER), "--model", tiny_bert, "--analogy", "sat", "--classification",
                "none", "--split", "valid", "test", "--cache_dir", str(cache), "--no-progress", "--output", str(out)]

    procs = [subprocess.Popen(cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for out in outs[:3]]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(log[-2000:] for log in logs)
    results = [json.loads(out.read_text())["models"]["model"] for out in outs[:3]]
    assert all(r["analogy"] == results[0]["analogy"] for r in results)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".npz") and not files[0].startswith(".tmp_"), files
    fourth = run(cmd(outs[3]))
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    again = json.loads(outs[3].read_text())["models"]["model"]
    assert again["cache_hit"] is True and again["analogy"] == results[0]["analogy"]
