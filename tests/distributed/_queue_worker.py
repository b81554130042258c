"""One rank of the work-queue test (run by test_work_queue.py under torchrun).

Usage: torchrun --standalone --nproc_per_node N _queue_worker.py MODE OUT_DIR

MODE ``ok``: claims 40 queue items, then encodes a pair list while running three jobs from the
same queue (one slow), and encodes the same pairs with the lockstep ``encode_sharded``; writes what
it claimed, ran and computed to OUT_DIR/rank<r>.json. MODE ``fail``: the second job raises on
whichever rank takes it; every rank writes the error it got.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from relbert_ds.evaluation.sharding import encode_sharded, encode_sharing_ranks  # noqa: E402
from relbert_ds.parallel.work_queue import WorkQueue  # noqa: E402
from tests.fakes import FakeEncoder  # noqa: E402

SLOW_JOB_S = 1.5


class SlowEncoder(FakeEncoder):
    """FakeEncoder whose forwards take a few milliseconds, so that a slow job's rank falls behind."""

    def embed(self, pairs):
        time.sleep(0.005)
        return super().embed(pairs)


def pairs() -> list[tuple[str, str]]:
    words = [f"w{i}" * (1 + i % 3) for i in range(24)]
    return [(a, b) for a in words for b in words if a != b][:400]


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record: dict = {"rank": rank}
    try:
        claimed = []
        for item in WorkQueue(40):
            claimed.append(item)
            time.sleep(0.002)
        record["claimed"] = claimed

        def job(i: int, seconds: float):
            def run():
                if mode == "fail" and i == 1:
                    raise ValueError("job 1 failed on purpose")
                time.sleep(seconds)
                return {"job": i, "digest": hashlib.sha256(str(i).encode()).hexdigest()[:8]}
            return run

        encoder = SlowEncoder()
        jobs = [job(0, SLOW_JOB_S), job(1, 0.05), job(2, 0.05)]
        run = encode_sharing_ranks(encoder, pairs() + pairs()[:10], jobs, batch_size=8)
        record["jobs"] = {str(k): v for k, v in run.job_results.items()}
        record["shares"] = run.ranks
        lockstep = encode_sharded(encoder, pairs() + pairs()[:10], batch_size=8)
        record["same_table"] = bool((run.table == lockstep).all()) and run.table.shape == lockstep.shape
        record["table_digest"] = hashlib.sha256(run.table.tobytes()).hexdigest()
        # Nothing left to encode (every pair was in the first group): the jobs still run, the table is empty.
        empty = encode_sharing_ranks(encoder, [], [job(7, 0.0)], batch_size=8)
        record["empty"] = {"shape": list(empty.table.shape), "jobs": {str(k): v for k, v in empty.job_results.items()},
                           "shares": empty.ranks}
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank got
        record["error"] = f"{type(exc).__name__}: {exc}"
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
