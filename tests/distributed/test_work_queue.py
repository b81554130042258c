"""Real gloo ranks share a work queue: every item is claimed once, a rank busy with a long job encodes
less, the vectors equal the lockstep encoder's bit for bit, and a failing job stops every rank (no hang)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.launch import run, tool

WORKER = Path(__file__).resolve().parent / "_queue_worker.py"
WORLD = 3


def _launch(mode: str, out: Path) -> list[dict]:
    result = run([tool("torchrun"), "--standalone", "--nproc_per_node", str(WORLD), str(WORKER), mode, str(out)],
                 timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ranks_claim_each_item_once_and_share_encoding_with_jobs(tmp_path):
    ranks = _launch("ok", tmp_path)
    for r in ranks:
        assert "error" not in r, r["error"]
    claimed = [i for r in ranks for i in r["claimed"]]
    assert sorted(claimed) == list(range(40))  # each item exactly once
    assert all(r["claimed"] == sorted(r["claimed"]) for r in ranks)
    # Every job ran on exactly one rank; its result is that rank's.
    ran = {int(k): (r["rank"], v) for r in ranks for k, v in r["jobs"].items()}
    assert sorted(ran) == [0, 1, 2]
    assert all(v["job"] == k for k, (_, v) in ran.items())
    # Every rank got the same table, equal to the lockstep encoder's, and the same record of the shares.
    assert all(r["same_table"] for r in ranks)
    assert len({r["table_digest"] for r in ranks}) == 1
    shares = ranks[0]["shares"]
    assert all(r["shares"] == shares for r in ranks) and len(shares) == WORLD
    assert sum(s["jobs"] for s in shares) == 3
    n_batches = -(-400 // 8)
    assert sum(s["batches"] for s in shares) == n_batches
    # The rank that ran the 1.5 s job encoded less than each of the others (~5 ms a batch): the queue balanced.
    slow = ran[0][0]
    assert all(shares[slow]["batches"] < s["batches"] for i, s in enumerate(shares) if i != slow)
    assert shares[slow]["jobs_s"] >= 1.5
    # With no pairs to encode the job still ran once, and every rank got the empty (0, H) table.
    assert all(r["empty"]["shape"] == [0, 8] for r in ranks)
    assert [v["job"] for r in ranks for v in r["empty"]["jobs"].values()] == [7]
    assert sum(s["batches"] for s in ranks[0]["empty"]["shares"]) == 0


def test_a_failing_job_stops_every_rank(tmp_path):
    ranks = _launch("fail", tmp_path)  # every rank returned (the launch has a timeout) and wrote its error
    for r in ranks:
        assert r.get("error", "").startswith("AgreedError: rank "), r
        assert r["error"].endswith("ValueError: job 1 failed on purpose"), r
