"""REAL gloo ranks vs one process: cross-device losses are exact.

The workers (``_loss_worker.py``, one subprocess per rank) each encode their local slice of
a RelationAwareSampler global batch, backpropagate their loss share and average parameter
gradients over the ranks as DeepSpeed/DDP do. Here, one process computes the same loss
over the sampler's global batch with world size 1. Loss values, metrics and gradients must
agree to 1e-6 in fp32, and the classic no-grad-gather bug must be caught. Two launches: 2
ranks, and 6 ranks where a rank holds no positive anchor and a rank a single prompt.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_loss_worker.py"
TIMEOUT_S = 600  # the whole launch (6 ranks on 2 shared cores); a hung collective fails the test, not the suite


def _load_worker():
    spec = importlib.util.spec_from_file_location("_loss_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def launch(out: Path, world: int) -> list[dict]:
    """Launch ``world`` ranks; their saved results, in rank order."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port = free_port()
    files = [out / f"rank{r}.pt" for r in range(world)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(files[r])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {world}-rank workers did not finish within {TIMEOUT_S} s (a collective hung?)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("ranks"), W.WORLD)


@pytest.fixture(scope="module")
def edge_results(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("edge_ranks"), W.EDGE_WORLD)


def one_process(world: int, cases=W.CASES) -> dict:
    """The losses in this process (world size 1) over the global batch of the launch's step."""
    s = W.sampler(0, world)
    epoch, step = W.choose_step(world)
    whole = s.global_batch(epoch, step)
    feats = W.features(s.num_pairs)
    return {case: W.run_case(case, whole, feats) for case in cases}


@pytest.fixture(scope="module")
def reference() -> dict:
    out = one_process(W.WORLD)
    s = W.sampler(0)
    epoch, step = W.choose_step()
    out["empty_rank1"] = W.run_case("triplet", s.local_batch(epoch, step), W.features(s.num_pairs))
    return out


@pytest.fixture(scope="module")
def edge_reference() -> dict:
    return one_process(W.EDGE_WORLD)


def assert_equal_to_one_process(ranks: list[dict], ref: dict) -> None:
    for res in ranks:
        assert res["value"] == pytest.approx(ref["value"], abs=1e-6)  # global value on every rank
        for key, want in ref["metrics"].items():
            assert res["metrics"][key] == pytest.approx(want, abs=1e-6), key
        assert len(res["grads"]) == len(ref["grads"])
        for got, want in zip(res["grads"], ref["grads"]):
            # fp32: entries above 1 differ by an ulp or so when 6 ranks sum in another order
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    # Each rank backpropagates W x its share / T: the mean over ranks is the global loss.
    assert sum(r["loss"] for r in ranks) / len(ranks) == pytest.approx(ref["loss"], abs=1e-6)
    assert ref["loss"] == pytest.approx(ref["value"], abs=1e-6)
    assert max(g.abs().max().item() for g in ref["grads"]) > 1e-3  # the comparison is not vacuous


def test_the_scenarios_exercise_uneven_ranks_and_edge_ranks(rank_results, edge_results):
    sizes = [r["n_local"] for r in rank_results]
    assert sizes[0] != sizes[1]
    epoch, step = W.choose_step(W.EDGE_WORLD)
    parts = W.rank_batches(W.EDGE_WORLD, epoch, step)
    assert [r["n_local"] for r in edge_results] == [len(p) for p in parts]
    assert any(not bool(p.is_positive.any()) for p in parts)  # a rank without an anchor
    assert 1 in [len(p) for p in parts]  # a rank with one prompt


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
        assert c["sum"].tolist() == [1.0, 2.0]
        assert c["objects"] == [{"rank": 0, "failed": []}, {"rank": 1, "failed": ["x"]}]
        assert tuple(c["world_info"]) == (rank, 2)


def test_gather_rows_is_one_collective_with_exact_values_ids_and_gradients(rank_results):
    x0 = torch.arange(6, dtype=torch.float32).view(2, 3)
    x1 = torch.arange(9, dtype=torch.float32).view(3, 3) + 100
    w = torch.arange(15, dtype=torch.float32).view(5, 3)
    for rank, res in enumerate(rank_results):
        c = res["collectives"]
        assert torch.equal(c["rows_gathered"], torch.cat([x0, x1]))
        assert c["rows_ids"].tolist() == [[0, -7], [0, -6], [1, -7], [1, -6], [1, -5]]
        assert torch.equal(c["rows_grad"], 3 * w[slice(0, 2) if rank == 0 else slice(2, 5)])


def test_a_loss_step_is_one_gather_and_one_reduce_scatter_with_planned_row_counts(rank_results, edge_results):
    """Per loss forward + backward: before, a size gather, the embedding gather and an id gather (3
    all-gathers); now one all-gather of rows and ids (plus the size gather when the caller does not
    pass the plan's counts) and the gradient's one reduce-scatter. The loss's statistics all-reduce
    is the same in both."""
    for res in [*rank_results, *edge_results]:
        planned, exchanged = res["collective_calls"]["sizes_planned"], res["collective_calls"]["sizes_exchanged"]
        gathers = {k: v for k, v in planned.items() if k.startswith("all_gather")}
        assert sum(gathers.values()) == 1 and sum(v for k, v in planned.items() if "reduce_scatter" in k) == 1
        assert sum(v for k, v in exchanged.items() if k.startswith("all_gather")) == 2  # + the sizes
        assert planned.get("all_reduce") == exchanged.get("all_reduce")
        assert not any(k.startswith("all_to_all") for k in planned)


@pytest.mark.parametrize("case", ["nce", "iloob", "triplet", "nce+classification"])
@pytest.mark.parametrize("counts", ["", "/planned_counts"])
def test_two_ranks_equal_one_process(rank_results, reference, case, counts):
    assert_equal_to_one_process([r["cases"][case + counts] for r in rank_results], reference[case])


def test_bf16_on_the_wire_follows_the_fp32_loss(rank_results, edge_results, reference, edge_reference):
    """Embeddings sent in bf16 (rounded to 8 bits of mantissa; the loss and the gradient sum stay fp32):
    the loss within 2e-3 relative of fp32's, gradients within 2% of their largest entry; and not equal,
    so the payload really was bf16."""
    for ranks, ref in ((rank_results, reference["nce"]), (edge_results, edge_reference["nce"])):
        for res in (r["cases"]["nce/bf16_wire"] for r in ranks):
            assert res["value"] == pytest.approx(ref["value"], rel=2e-3) and res["value"] != ref["value"]
            for got, want in zip(res["grads"], ref["grads"]):
                assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("case", ["nce", "iloob", "triplet", "nce+classification"])
def test_ranks_without_anchors_or_with_one_prompt_equal_one_process(edge_results, edge_reference, case):
    assert_equal_to_one_process([r["cases"][case] for r in edge_results], edge_reference[case])


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
