"""Two REAL gloo ranks vs one process: cross-device losses are exact.

The workers (``_loss_worker.py``, one subprocess per rank) each encode their local slice of
a RelationAwareSampler global batch, backpropagate their loss share and average parameter
gradients over the ranks as DeepSpeed/DDP do. Here, one process computes the same loss
over the concatenated global batch with world size 1. Loss values and gradients must agree
to 1e-6 in fp32, and the classic no-grad-gather bug must be caught.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_loss_worker.py"
TIMEOUT_S = 120  # the whole launch; a hung collective fails the test instead of the suite


def _load_worker():
    spec = importlib.util.spec_from_file_location("_loss_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Launch the 2 ranks once; their saved results, in rank order."""
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port = _free_port()
    files = [out / f"rank{r}.pt" for r in range(W.WORLD)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(W.WORLD), str(port), str(files[r])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(W.WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the 2-rank workers did not finish within {TIMEOUT_S} s (a collective hung?)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def reference() -> dict:
    """The same losses in this process (world size 1) over the concatenated global batch."""
    s = W.sampler(0)
    epoch, step = W.choose_step(s)
    plan = s.plan(epoch, step)
    whole = s.batch_from_groups([g for groups in plan for g in groups], epoch, step)
    feats = W.features(s.num_pairs)
    out = {case: W.run_case(case, whole, feats) for case in W.CASES}
    out["empty_rank1"] = W.run_case("triplet", s.batch_from_groups(plan[0], epoch, step), feats)
    return out


def test_the_scenario_exercises_uneven_ranks(rank_results):
    sizes = [r["n_local"] for r in rank_results]
    assert sizes[0] != sizes[1]


def test_uneven_autograd_gather(rank_results):
    x0 = torch.arange(6, dtype=torch.float32).view(2, 3)
    x1 = torch.arange(9, dtype=torch.float32).view(3, 3) + 100
    expected = torch.cat([x0, x1])
    w = torch.arange(15, dtype=torch.float32).view(5, 3)
    for rank, res in enumerate(rank_results):
        c = res["collectives"]
        assert torch.equal(c["gathered"], expected)
        # rank r weighs the gathered rows by (r + 1) * w: the local grad sums 1*w + 2*w.
        rows = slice(0, 2) if rank == 0 else slice(2, 5)
        assert torch.equal(c["grad"], 3 * w[rows])
        assert c["ids"].tolist() == [0, 0, 1, 1, 1]
        assert c["flags"].dtype == torch.bool and c["flags"].tolist() == [False, False, True, True, True]
        assert c["mean"] == 0.5 and c["mean_tensor"] == 1.0
        assert tuple(c["world_info"]) == (rank, 2)


@pytest.mark.parametrize("case", ["nce", "iloob", "triplet", "nce+classification"])
def test_two_ranks_equal_one_process(rank_results, reference, case):
    ref = reference[case]
    ranks = [r["cases"][case] for r in rank_results]
    for res in ranks:
        assert res["value"] == pytest.approx(ref["value"], abs=1e-6)  # global value on every rank
        for key, want in ref["metrics"].items():
            assert res["metrics"][key] == pytest.approx(want, abs=1e-6), key
        assert len(res["grads"]) == len(ref["grads"])
        for got, want in zip(res["grads"], ref["grads"]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Each rank backpropagates W x its share / T: the mean over ranks is the global loss.
    assert sum(r["loss"] for r in ranks) / len(ranks) == pytest.approx(ref["loss"], abs=1e-6)
    assert ref["loss"] == pytest.approx(ref["value"], abs=1e-6)
    assert max(g.abs().max().item() for g in ref["grads"]) > 1e-3  # the comparison is not vacuous


def test_a_rank_without_rows(rank_results, reference):
    ref = reference["empty_rank1"]
    for res in rank_results:
        got = res["empty_rank1"]
        assert got["value"] == pytest.approx(ref["value"], abs=1e-6)
        for g, want in zip(got["grads"], ref["grads"]):
            torch.testing.assert_close(g, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["nce", "triplet"])
def test_no_grad_gather_bug_is_caught(rank_results, reference, case):
    ref = reference[case]
    for res in rank_results:
        buggy = res["buggy"][case]
        assert buggy["value"] == pytest.approx(ref["value"], abs=1e-6)  # the value cannot tell
        worst = max((got - want).abs().max().item() for got, want in zip(buggy["grads"], ref["grads"]))
        scale = max(want.abs().max().item() for want in ref["grads"])
        assert worst > 0.05 * scale, "a no-grad gather must give visibly wrong gradients"
