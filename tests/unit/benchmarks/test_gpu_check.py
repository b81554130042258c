"""benchmarks/gpu_check.py without a GPU: one line, exit 0, nothing written (the committed results
of a GPU run must not be replaced by an empty file). Chosen behaviour, documented in the script:
no JSON at all rather than a JSON that says "skipped"."""
import sys

from tests.launch import rank_env, run


def test_no_gpu_prints_one_line_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    work = tmp_path / "work"
    result = run([sys.executable, "benchmarks/gpu_check.py", "--output", str(out), "--work_dir", str(work)],
                 timeout=300, env=rank_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("gpu_check: no CUDA GPU visible") and "nothing written" in lines[0]
    assert "CUDA_VISIBLE_DEVICES=)" in lines[0]  # says why: the variable hid every device
    assert "Traceback" not in result.stderr
    assert not out.exists() and not work.exists()


def test_no_gpu_quick_mode_is_the_same_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--output", str(out)], timeout=300,
                 env=rank_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("gpu_check: no CUDA GPU visible") and not out.exists()


# --------------------------------------------------------------------------- budget, kills, results kept
# The driver runs in this process with the worker script replaced by a stand-in whose jobs hang (each
# leaving a child in a session of its own): what is killed, skipped, failed and written is then the
# driver's doing. The job floors are set to 1 s so that the budget, not the floors, decides.

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402

from benchmarks import gpu_check  # noqa: E402

STANDIN = Path(__file__).with_name("gpu_check_standin.py")


@pytest.fixture
def standin(monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    monkeypatch.setattr(gpu_check, "WORKER_SCRIPT", STANDIN)
    monkeypatch.setattr(gpu_check, "FLOOR_S", {kind: 1 for kind in gpu_check.FLOOR_S})
    monkeypatch.setenv("STANDIN_PIDS", str(pids))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return pids


def alive(pids_file: Path) -> list[int]:
    pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def equivalence_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--allow_cpu", "--parts", "equivalence", "--work_dir", str(tmp_path / "work"),
            "--output", str(tmp_path / "out.json"), *extra]


def test_the_budget_stops_a_hung_job_kills_its_whole_tree_and_skips_the_rest(standin, tmp_path):
    start = time.monotonic()
    rc = gpu_check.main(equivalence_args(tmp_path, "--budget_s", "25", "--timeout", "300"))
    took = time.monotonic() - start
    doc = json.loads((tmp_path / "out.json").read_text())
    jobs = doc["equivalence"]["jobs"]
    assert rc == 0 and doc["failed"] == [] and doc["finished"]  # the budget skips, it does not fail
    assert jobs["1"]["status"] == "skipped" and "stopped at the time budget" in jobs["1"]["reason"]
    assert jobs["2"]["status"] == "skipped" and jobs["2"]["reason"].startswith("time budget")
    assert "wall_s" not in jobs["2"]  # never started
    assert len(standin.read_text().split()) == 2  # torchrun's rank and its own-session child, of job 1 only
    assert alive(standin) == []
    assert took < 25 + 20


def test_a_job_past_its_own_timeout_fails_and_nothing_of_it_survives(standin, tmp_path):
    rc = gpu_check.main(equivalence_args(tmp_path, "--budget_s", "200", "--timeout", "6"))
    doc = json.loads((tmp_path / "out.json").read_text())
    jobs = doc["equivalence"]["jobs"]
    assert rc == 1 and sorted(doc["failed"]) == ["equivalence/jobs/1", "equivalence/jobs/2"]
    assert all(j["status"] == "failed" and "ran past --timeout 6 s" in j["error"] for j in jobs.values())
    assert len(standin.read_text().split()) == 2 + 4  # 1 rank, then 2 ranks, each with its child
    assert alive(standin) == []


def test_sigterm_kills_the_running_job_and_writes_the_json(standin, tmp_path):
    def terminate_once_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (standin.exists() and len(standin.read_text().split()) >= 2):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=terminate_once_running, daemon=True)
    thread.start()
    before = signal.getsignal(signal.SIGTERM)
    rc = gpu_check.main(equivalence_args(tmp_path, "--budget_s", "300", "--timeout", "300"))
    thread.join(5)
    doc = json.loads((tmp_path / "out.json").read_text())
    assert rc == 143 and doc["stopped"] == "SIGTERM or Ctrl-C" and not doc["finished"]
    assert doc["config"]["parts"] == ["equivalence"] and doc["gpus"] == 0
    assert alive(standin) == [] and signal.getsignal(signal.SIGTERM) == before


def test_no_time_left_starts_nothing_and_fails_nothing(standin, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "FLOOR_S", {kind: 60 for kind in gpu_check.FLOOR_S})
    rc = gpu_check.main(["--allow_cpu", "--work_dir", str(tmp_path / "work"), "--output", str(tmp_path / "out.json"),
                         "--budget_s", "30"])
    doc = json.loads((tmp_path / "out.json").read_text())
    assert rc == 0 and doc["failed"] == [] and not standin.exists()
    assert doc["smoke"]["model"]["status"] == "skipped" and doc["timed"]["runs"]["2"]["reason"] == "no model"
    assert "needs about 60 s" in doc["smoke"]["model"]["reason"]


def test_micro_batch_search_keeps_what_it_found_when_an_error_follows_an_oom():
    """After an out-of-memory error DeepSpeed may fail in other ways (an AssertionError mid-step): the
    search stops there with the largest k that fitted and every state reported."""
    answers = {1: True, 2: True, 4: True, 8: False, 6: None}
    calls, reports = [], []

    def fits(k):
        calls.append(k)
        return answers[k]

    state = gpu_check.search_micro_batch(fits, max_tile=64, bisect_steps=5, report=lambda s: reports.append(dict(s)))
    assert calls == [1, 2, 4, 8, 6]
    assert state["largest_fitting_k"] == 4 and state["smallest_failing_k"] == 8 and state["stopped_by_error"]
    assert reports[-1] == state and [r["largest_fitting_k"] for r in reports[:3]] == [1, 2, 4]


def test_micro_batch_search_bisects_to_the_boundary_and_marks_a_capped_search():
    state = gpu_check.search_micro_batch(lambda k: k <= 11, max_tile=64, bisect_steps=5, report=lambda s: None)
    assert (state["largest_fitting_k"], state["smallest_failing_k"]) == (11, 12) and not state["stopped_by_error"]
    capped = gpu_check.search_micro_batch(lambda k: True, max_tile=8, bisect_steps=5, report=lambda s: None)
    assert capped["largest_fitting_k"] == 8 and capped["search_capped"] and capped["smallest_failing_k"] is None
