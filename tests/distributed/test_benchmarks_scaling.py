"""benchmarks/scaling.py: the GPU model's formulas (fast, one process) and the --quick run for real
(1 and 2 torchrun ranks, tiny random BERT): every part of the step is reported, and the bytes the
counting shim saw equal the byte formulas, computed here independently from the model's files."""
import json
import math
import sys
from types import SimpleNamespace

import pytest

from benchmarks import scaling
from tests.launch import check, rank_env, run


def _assumptions(**over):
    base = dict(gpus_per_node=8, peak_tflops=989.0, mfu=0.4, nvlink_GBps=900.0, inter_node_Gbps=400.0,
                nics_per_node=1, latency_us=0.0, hbm_TBps=3.35, grad_bytes=2, model_prompts_per_gpu=128,
                model_global_prompts=4096, deepspeed_config="ds_configs/zero2.json", host_results="",
                small_collectives=4, prompts_per_group=16, dataset_relations=79)
    base.update(over)
    return SimpleNamespace(**base)


SHAPE = {"parameters": 1_000_000, "matmul_parameters": 800_000, "hidden_size": 1024, "num_layers": 4}


def test_model_collectives_follow_the_ring_formula():
    args = _assumptions()
    # Within a node: half of NVLink; across nodes: the node's NIC (400 Gb/s = 50 GB/s).
    assert scaling.bus_bandwidth(args, 8) == 450e9 and scaling.bus_bandwidth(args, 16) == 50e9
    p8 = scaling.model_step(args, SHAPE, 8, 128, 20.0)
    # every prompt's bf16 embedding and 4 int64 ids on every rank; the gradient back in fp32
    fwd, bwd = 128 * 8 * (1024 * 2 + 32), 128 * 8 * 1024 * 4
    assert p8["embedding_gather"] == pytest.approx(7 / 8 * (fwd + bwd) / 450e9)  # all-gather + reduce-scatter
    assert p8["gradient_allreduce"] == pytest.approx(7 / 8 * 2_000_000 / 450e9)  # bf16 reduce-scatter
    flops = 128 * 20 * 3 * (2 * 800_000 + 4 * 4 * 20 * 1024)
    assert p8["encode_forward"] + p8["encode_backward"] == pytest.approx(flops / (989e12 * 0.4))
    assert p8["step"] == pytest.approx(sum(v for k, v in p8.items() if k != "step"))
    # Weak scaling within the inter-node regime: the gather grows with N, the gradient traffic does not.
    p64, p512 = (scaling.model_step(args, SHAPE, n, 128, 20.0) for n in (64, 512))
    assert p512["embedding_gather"] / p64["embedding_gather"] == pytest.approx((511 / 512 * 512) / (63 / 64 * 64))
    assert p512["gradient_allreduce"] == pytest.approx(p64["gradient_allreduce"], rel=0.02)
    assert scaling.model_step(args, SHAPE, 1, 128, 20.0)["embedding_gather"] == 0.0


def test_largest_world_for_the_gather():
    args = _assumptions()
    found = scaling.largest_world(args, SHAPE, 20.0, "weak")
    n = found["gpus"]

    def share(gpus: int) -> float:
        parts = scaling.model_step(args, SHAPE, gpus, 128, 20.0)
        return parts["embedding_gather"] / parts["step"]

    assert share(n) < 0.10 <= share(2 * n)  # the largest power of two under 10%, the next one over
    strong = scaling.largest_world(args, SHAPE, 20.0, "strong")
    assert strong["searched_up_to"] == 4096  # stops at one prompt per GPU


@pytest.mark.slow
def test_quick_run_reports_every_part_and_measured_bytes_equal_the_formula(tiny_bert, tmp_path):
    out, page, fig = tmp_path / "scaling.json", tmp_path / "SCALING.md", tmp_path / "scaling.png"
    check(run([sys.executable, "benchmarks/scaling.py", "--quick", "--model", tiny_bert, "--work_dir",
               str(tmp_path / "work"), "--output", str(out), "--markdown", str(page), "--figure", str(fig)],
              timeout=1500, env=rank_env()))
    doc = json.loads(out.read_text())
    measured = {m["world_size"]: m for m in doc["measured"]}
    assert sorted(measured) == [1, 2]
    for m in measured.values():
        assert set(m["parts_s"]) == set(scaling.PARTS)
        assert all(math.isfinite(v) for v in m["parts_s"].values())
        assert m["parts_s"]["encode_forward"] > 0 and m["parts_s"]["encode_backward"] > 0
        assert m["parts_s"]["optimizer"] > 0 and m["step_s"] > 0
    two = measured[2]
    assert two["parts_s"]["embedding_gather"] > 0 and two["parts_s"]["gradient_allreduce"] > 0
    assert two["parts_s"]["parameter_allgather"] > 0
    # Independent expectations: --quick is 8 relations x (4 positives + 4 negatives) prompts; the tiny model's sizes.
    config = json.loads((__import__("pathlib").Path(tiny_bert) / "config.json").read_text())
    from transformers import AutoModel

    params = sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert).parameters())
    prompts = 8 * (4 + 4)
    assert two["prompts_per_step"] == prompts and two["prompts_per_rank"] == [32, 32]
    b = two["bytes"]
    # exact: 32 rows per rank; forward: fp32 embeddings and 4 int64 ids per row in one all-gather
    assert b["gather_fwd"]["bytes_per_rank"] == prompts * (config["hidden_size"] * 4 + 32)
    assert b["gather_fwd"]["calls_per_step"] == 1 and b["gather_ids"]["calls_per_step"] == 0  # no size exchange
    assert b["gather_bwd"]["bytes_per_rank"] == prompts * config["hidden_size"] * 4
    assert b["gather_fwd"]["min_rank"] == b["gather_fwd"]["max_rank"]
    # ZeRO-2 on gloo: one gradient all-reduce of the parameters that get gradients (the unused pooler
    # does not: 33 x 32 of ~1M), and the all-gather of the updated parameters.
    assert b["gradient_allreduce"]["bytes_per_rank"] == pytest.approx(params * 4, rel=0.01)
    # The shipped zero2.json reduces each slice to its owner (one reduce per rank, not DeepSpeed's default
    # all-reduce of the bucket): on a ring that sends (N-1)/N of the payload, half an all-reduce's 2(N-1)/N.
    assert b["gradient_allreduce"]["calls_per_step"] == 2
    assert b["gradient_allreduce"]["ring_bytes_sent_per_rank"] == pytest.approx(
        b["gradient_allreduce"]["bytes_per_rank"] / 2)
    assert scaling.wire_factor("all_reduce", 4) == 1.5 and scaling.wire_factor("reduce", 4) == 0.75
    assert b["parameter_allgather"]["bytes_per_rank"] == pytest.approx(params * 4, rel=0.01)
    assert all(c["relative_error"] < 0.01 for c in doc["byte_checks"])
    assert {c["collective"] for c in doc["byte_checks"]} == {"gather_fwd", "gather_bwd", "gradient_allreduce",
                                                             "parameter_allgather"}
    # One rank: no collective moves anything.
    assert measured[1]["bytes"]["gather_fwd"]["bytes_per_rank"] == 0
    # The labelled GPU model, the page and the figure.
    assert doc["model"]["label"] == "MODEL (not a measurement)"
    assert {(r["model"], r["scaling"], r["gpus"]) for r in doc["model"]["rows"]} == {
        (m, s, n) for m in ("roberta-large", "7B decoder") for s in ("weak", "strong") for n in (8, 64, 512)}
    assert doc["oversubscribed"]["cpu_cores"] >= 1 and len(doc["loadavg_start"]) == 3
    text = page.read_text()
    assert "MODEL (not a measurement)" in text and "benchmarks/scaling.py --quick" in text
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
