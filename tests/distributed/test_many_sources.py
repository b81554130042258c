"""Several training sets in one run, through the real command line: 5,000 generated relations
trained on 2 ranks and planned for 64; the bundled SemEval-2012 with a second source in a local
folder trained on 2 ranks with validation per source; bad sources and weights refused with one
``error:`` line from rank 0, exit status 2 and nothing written."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.assertions import assert_one_error_line
from tests.fakes import write_relations
from tests.launch import check, run, tool, torchrun_cmd

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"
QUIET = ["--no-projector", "--no-tensorboard", "--lr", "1e-4", "--warmup_steps", "0"]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    return write_relations(tmp_path_factory.mktemp("big") / "big5000", 5000, tag="b")


@pytest.fixture(scope="module")
def extra_source(tmp_path_factory) -> Path:
    """A second relational-similarity set with parents of its own and a validation split."""
    return write_relations(tmp_path_factory.mktemp("second") / "extra", 12, positives=4, negatives=3, parents=3,
                           tag="x")


def test_five_thousand_relations_train_on_two_ranks(tiny_bert, big_source, tmp_path):
    out = tmp_path / "run"
    cmd = torchrun_cmd(TRAIN, "--model", tiny_bert, "--output_dir", str(out), "--train_data", str(big_source),
                       "semeval2012", "--train_weights", "1", "2", "--relations_per_step", "64",
                       "--positives_per_relation", "3", "--negatives_per_relation", "2", "--max_steps", "2",
                       "--metric", "none", "--analogy", "--deepspeed_config", "ds_configs/zero2.json", *QUIET)
    check(run(cmd, timeout=600))
    steps = [r for r in history(out) if r["kind"] == "step"]
    assert [r["optimizer_step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    # 5,000 relations of weight 1 and 79 of weight 2: 5,158 slots, 64 per step
    assert resolved["world_size"] == 2 and resolved["steps_per_epoch"] == math.ceil(5158 / 64)
    assert (out / "model" / "model.safetensors").is_file()


def test_five_thousand_relations_planned_for_64_ranks(big_source):
    result = check(run([tool("relbert-ds-train"), "--dry_run", "--world_size", "64", "--train_data", str(big_source),
                        "semeval2012", "--train_weights", "1", "2", "--relations_per_step", "512",
                        "--positives_per_relation", "3", "--negatives_per_relation", "2", "--max_steps", "100"],
                       timeout=300))
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["relations"] == 5079 and plan["world_size"] == 64
    assert plan["prompts_per_step"] == 512 * 5
    assert plan["prompts_per_rank_min"] == plan["prompts_per_rank_max"] == 40
    assert plan["steps_per_epoch"] == math.ceil(5158 / 512) and plan["total_steps"] == 100


@pytest.fixture(scope="module")
def combined_run(tiny_bert, extra_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("combined") / "run"
    cmd = torchrun_cmd(TRAIN, "--model", tiny_bert, "--output_dir", str(out), "--train_data", "semeval2012",
                       str(extra_source), "--relations_per_step", "8", "--positives_per_relation", "4",
                       "--negatives_per_relation", "3", "--max_steps", "2", "--metric", "analogy", "--analogy",
                       "semeval2012", "--parent_grouping", "--deepspeed_config", "ds_configs/zero2.json", *QUIET)
    check(run(cmd, timeout=600))
    return out


def test_semeval_with_a_second_local_source_trains_and_validates(combined_run):
    records = history(combined_run)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["optimizer_step"] for r in steps] == [1, 2]
    evals = [r for r in records if r["kind"] != "step"]
    assert len(evals) == 1 and evals[0]["optimizer_step"] == 2
    assert all(0.0 <= acc <= 1.0 for acc in evals[0]["analogy"].values())
    config = json.loads((combined_run / "config.json").read_text())
    assert config["data"]["train_data"][0] == "semeval2012" and config["resolved"]["steps_per_epoch"] == \
        math.ceil(91 / 8)


def test_validation_reports_one_accuracy_per_source(combined_run):
    evals = [r for r in history(combined_run) if r["kind"] != "step"]
    assert set(evals[0]["analogy"]) == {"semeval2012", "extra"}


# --------------------------------------------------------------------------- bad input


def assert_refused(result, out: Path, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert not any("error:" in line and not line.startswith("error:") for line in result.stderr.splitlines())
    error = assert_one_error_line(result.stderr, *needles)
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # bad input leaves no folder behind
    return error


def refuse(tmp_path: Path, *args: str):
    out = tmp_path / "run"
    return run([tool("relbert-ds-train"), "--output_dir", str(out), "--metric", "none", "--analogy", *args],
               timeout=300), out


def test_a_source_that_cannot_be_read_on_two_ranks(tiny_bert, tmp_path):
    from tests.cluster.helpers import run_ranks

    out = tmp_path / "run"
    ranks = run_ranks(TRAIN, ["--model", tiny_bert, "--output_dir", str(out), "--train_data", "semeval2012",
                              str(tmp_path / "no_such_folder"), "--metric", "none", "--analogy"], 2, timeout=400)
    report = "\n".join(f"--- rank {r.rank} (exit {r.returncode})\n{r.stderr[-2000:]}" for r in ranks)
    assert [r.returncode for r in ranks] == [2, 2], report
    assert not any("error:" in r.stdout + r.stderr for r in ranks[1:]), report  # rank 0 alone says it
    assert_refused(subprocess.CompletedProcess([], 2, ranks[0].stdout, ranks[0].stderr), out,
                   "no such file or folder", "no_such_folder")


def test_an_empty_source(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    assert_refused(*refuse(tmp_path, "--train_data", "semeval2012", str(empty)), "holds no records")


def test_a_relation_in_two_sources_with_different_pairs(tmp_path):
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "train.jsonl").write_text(json.dumps({"relation_type": "1a", "positives": [["x", "y"], ["u", "v"]],
                                                   "negatives": [["p", "q"]]}) + "\n")
    assert_refused(*refuse(tmp_path, "--train_data", "semeval2012", str(clash)), "'1a'", "different pairs")


@pytest.mark.parametrize("weights", [["1", "0"], ["1", "-2"], ["1", "nan"], ["1", "two"]])
def test_a_weight_that_is_not_a_positive_number(tmp_path, extra_source, weights):
    assert_refused(*refuse(tmp_path, "--train_data", "semeval2012", str(extra_source), "--train_weights", *weights),
                   "--train_weights")
