"""Every benchmark script, run for real with tiny settings (tiny random BERT, a step or two):
the JSON and the markdown table are written with the expected keys and sane values. No timing
is asserted: the figures of these runs mean nothing, only their presence does."""
import json
import math
import sys
from pathlib import Path

import pytest

from tests.launch import check, rank_env, run

BLESS = Path(__file__).resolve().parents[2] / "relbert_ds" / "resources" / "data" / "classification" / "BLESS"

pytestmark = pytest.mark.slow  # each starts real processes (launchers, ranks): 20-45 s on a 2-core machine


def bench(script: str, *args: str, timeout: float = 300):
    return check(run([sys.executable, f"benchmarks/{script}.py", *args], timeout=timeout,
                     env=rank_env(OMP_NUM_THREADS="2")))


def load(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert doc["machine"]["cpu_count"] >= 1 and len(doc["loadavg_start"]) == 3 and len(doc["loadavg_end"]) == 3
    assert doc["table_markdown"].startswith("|")
    return doc


def positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_train_throughput(tiny_bert, tmp_path):
    out = tmp_path / "tt.json"
    result = bench("train_throughput", "--skip_real", "--model", tiny_bert, "--relations_per_step", "4",
                   "--repeats", "2",
                   "--max_steps_per_repeat", "2", "--public_steps", "1", "--public_negatives", "24",
                   "--peak_tflops", "0.05", "--count_world_sizes", "1", "2", "--output", str(out))
    doc = load(out)
    assert doc["table_markdown"].strip() in result.stdout  # the printed table is the one saved
    assert set(doc["arms"]) == {"ours", "bare", "public", "public_longest"}
    for arm in doc["arms"].values():
        assert positive(arm["pairs_per_s"]) and positive(arm["tokens_per_s"]) and positive(arm["mfu"])
    assert doc["arms"]["ours"]["steps"] == doc["arms"]["bare"]["steps"] == 4
    assert doc["arms"]["ours"]["real_tokens_per_step"] == doc["arms"]["bare"]["real_tokens_per_step"]  # same tokens
    assert doc["arms"]["public"]["padded_tokens_per_step"] == 64 * doc["arms"]["public"]["pairs_per_step"]
    assert len(doc["repeats"]) == 2 and all(positive(r["overhead_ratio"]) for r in doc["repeats"])
    assert positive(doc["overhead_ratio"]["median"]) and doc["overhead_ratio"]["target"] == 1.10
    assert positive(doc["epoch_ratio_over_ours"]["public"]["median"])
    neg = doc["negatives"]
    assert neg["public"]["negatives_per_anchor"] == 24 and neg["ours"]["sequences_per_step"] == 64
    assert positive(neg["negatives_per_sequence_ratio_ours_over_public"])
    assert [w["world_size"] for w in neg["ours_by_world_size"]] == [1, 2]


def test_time_to_quality_interleaved(tiny_bert, tmp_path):
    out = tmp_path / "ttq.json"
    bench("time_to_quality", "--skip_real", "--model", tiny_bert, "--target", "0.2", "--ours_budget_min", "0.4",
          "--public_budget_min", "0.05", "--relations_per_step", "40", "--public_validate_every", "1",
          "--public_negatives", "16", "--output", str(out))
    doc = load(out)
    assert doc["config"]["mode"] == "interleaved" and set(doc["arms"]) == {"ours", "public"}
    ours, public = doc["arms"]["ours"], doc["arms"]["public"]
    assert ours["curve"] and public["curve"] and ours["optimizer_steps"] >= 2
    assert [p["epoch"] for p in ours["curve"]] == list(range(1, len(ours["curve"]) + 1))
    for arm in (ours, public):
        assert all(0 <= p["accuracy"] <= 1 and p["wall_s"] >= p["train_clock_s"] > 0 for p in arm["curve"])
    assert doc["targets"][0]["target"] == 0.2 and {"ours", "public"} <= set(doc["targets"][0])
    # re-reported against another target from the curves alone: first points at or above it
    again = tmp_path / "again.json"
    bench("time_to_quality", "--from_json", str(out), "--target", "0.0", "--output", str(again))
    redone = load(again)
    assert redone["arms"] == doc["arms"] and redone["targets"][0]["target"] == 0.0
    for arm in ("ours", "public"):
        first = doc["arms"][arm]["curve"][0]
        assert redone["targets"][0][arm]["reached"] and redone["targets"][0][arm]["wall_s"] == first["wall_s"]


def test_time_to_quality_sequential(tiny_bert, tmp_path):
    out = tmp_path / "ttq.json"
    bench("time_to_quality", "--mode", "sequential", "--skip_real", "--model", tiny_bert, "--target", "0.2",
          "--ours_budget_min", "1.5",
          "--public_budget_min", "0.05", "--nproc", "1", "--launcher", "python", "--public_validate_every", "1",
          "--public_negatives", "16", "--work_dir", str(tmp_path / "work"), "--output", str(out),
          "--ours_args", "--max_steps", "2", "--relations_per_step", "40", "--positives_per_relation", "2",
          "--negatives_per_relation", "2")
    doc = load(out)
    assert set(doc["arms"]) == {"ours", "public"} and 0 <= doc["zero_shot_accuracy"] <= 1
    ours, public = doc["arms"]["ours"], doc["arms"]["public"]
    assert ours["curve"] and public["curve"]
    assert all(0 <= p["accuracy"] <= 1 and positive(p["wall_s"]) for p in ours["curve"] + public["curve"])
    target = doc["targets"][0]
    assert target["target"] == 0.2 and {"ours", "public"} <= set(target)
    assert len(doc["targets"]) in (1, 2)  # plus the public arm's best when it differs


def test_eval_throughput(tiny_bert, tmp_path):
    out = tmp_path / "et.json"
    bench("eval_throughput", "--model", tiny_bert, "--analogy", "sat", "--split", "valid", "--repeats", "1",
          "--nprocs", "1", "2", "--output", str(out))
    doc = load(out)
    assert set(doc["arms"]) == {"ranks=1", "ranks=2", "naive"}
    assert doc["question_pairs"] == 37 * 6 and doc["unique_pairs"] <= doc["question_pairs"]
    assert doc["arms"]["naive"]["pairs_encoded"] == doc["question_pairs"]
    assert doc["arms"]["ranks=2"]["pairs_encoded"] == doc["unique_pairs"]
    assert all(positive(a["question_pairs_per_s"]["median"]) for a in doc["arms"].values())
    assert {"ranks=1 / ranks=2 (encode time)", "naive / ranks=1 (encode time)"} <= set(doc["ratios"])
    assert doc["accuracy_agreement"]["max_abs_difference"] < 0.03  # same encoder, same questions


def test_memory_measured(tiny_bert, tmp_path):
    out = tmp_path / "mem.json"
    bench("memory", "--models", "roberta-large", "--gpus", "8", "--measure_model", tiny_bert, "--measure_configs",
          "zero0", "zero3", "--measure_steps", "1", "--nproc", "1", "--launcher", "python",
          "--work_dir", str(tmp_path / "work"), "--output", str(out))
    doc = load(out)
    runs = doc["measured"]["runs"]
    assert set(runs) == {"zero0", "zero3"} and positive(doc["measured"]["floor_rss_mb"])
    for name, stage in (("zero0", 0), ("zero3", 3)):
        assert runs[name]["error"] is None and runs[name]["zero_stage"] == stage
        assert runs[name]["peak_rss_mb"] > 0


def test_quality_recipe_search_and_recipe(tiny_bert, tmp_path):
    search = tmp_path / "search.json"
    common = ["--model", tiny_bert, "--nproc", "1", "--launcher", "python", "--work_dir", str(tmp_path / "work"),
              "--max_steps", "1"]
    bench("quality_recipe", "search", "--runs", "nce_lr1e-4", "--epochs", "1", "--output", str(search), *common)
    doc = load(search)
    assert [r["name"] for r in doc["runs"]] == ["nce_lr1e-4"] and doc["winner"]["run"] == "nce_lr1e-4"
    assert set(doc["runs"][0]["curve"][0]["analogy"]) == {"semeval2012", "sat", "u2"}
    quality = tmp_path / "quality.json"
    bench("quality_recipe", "--run", "nce_lr1e-4", "--epochs", "1", "--eval_analogy", "sat",
          "--eval_classification", "none", "--output", str(quality), *common)
    doc = load(quality)
    rows = {(r["dataset"], r["split"]): r for r in doc["rows"]}
    assert set(rows) == {("SemEval-2012 analogy", "validation"), ("SAT", "test"), ("SAT", "validation")}
    assert all(0 <= r["zero_shot"] <= 1 and 0 <= r["trained"] <= 1 for r in rows.values())
    assert doc["recipe"]["selection_sets"] == ["semeval2012", "sat", "u2"] and "within_20_minutes" in doc


def test_launch_paths(tiny_bert, tmp_path):
    out = tmp_path / "lp.json"
    bench("launch_paths", "--paths", "python", "srun-env", "--steps", "2", "--work_dir", str(tmp_path / "runs"),
          "--output", str(out), "--", "--model", tiny_bert, "--relations_per_rank", "4")
    doc = load(out)
    assert set(doc["summary"]) == {"python", "srun-env"}
    assert doc["summary"]["python"]["world_size"] == 1 and doc["summary"]["srun-env"]["world_size"] == 2
    for path in ("python", "srun-env"):
        assert doc["summary"][path]["steps_timed"] == 1 and positive(doc["summary"][path]["median_step_s"])
        # the runs really trained through that path: their config says so
        resolved = json.loads((tmp_path / "runs" / path / "config.json").read_text())["resolved"]
        assert resolved["launcher"] == {"python": "single", "srun-env": "slurm"}[path]


def test_eval_throughput_probe_table_on_supplied_vectors(tmp_path):
    """--probe_table on vectors given in --work_dir (the probes only): both arms run on the same subset, the
    table and JSON report each arm's F1 and CPU seconds, and the ratio is computed from them."""
    import numpy as np

    from relbert_ds.data import load_classification_dataset
    from relbert_ds.evaluation.classification import classification_pairs

    work = tmp_path / "work"
    work.mkdir()
    pairs = sorted(set(classification_pairs(load_classification_dataset("BLESS"))))
    rng = np.random.default_rng(0)
    for label in ("backbone", "trained"):
        np.savez(work / f"{label}.npz", pairs=np.array(pairs, dtype=str),
                 model_vectors=rng.normal(size=(len(pairs), 8)).astype(np.float32))
    out = tmp_path / "pt.json"
    result = bench("eval_throughput", "--probe_table", "--probe_datasets", "BLESS", "--subset", "60", "--seeds", "0",
                   "--arms", "fast", "sklearn", "--trained_model", "given-by-its-vectors", "--work_dir", str(work),
                   "--output", str(out))
    section = json.loads(out.read_text())["probe_table"]
    assert section["config"]["classification"] == [str(work / "BLESS_subset60")]
    for label in ("backbone", "trained"):
        assert section[f"{label}_vectors"] == {"supplied": str(work / f"{label}.npz")}
        entry = section[f"{label}_probes"]["BLESS_subset60"]
        assert [r["arm"] for r in entry["runs"]] == ["fast", "sklearn"]
        assert all(0 <= r["f1_macro"] <= 1 and positive(r["cpu_s"]) for r in entry["runs"])
        assert entry["fast_speedup_cpu"] == pytest.approx(entry["sklearn"]["cpu_s"]["median"]
                                                          / entry["fast"]["cpu_s"]["median"])
        assert len(list((work / "probe_runs").glob(f"{label}_BLESS_subset60_0_*.json"))) == 2
    assert section["table_markdown"] in result.stdout and "KHN" not in section["table_markdown"]
    assert "BLESS cut to 60 pairs per split" in section["table_markdown"]
