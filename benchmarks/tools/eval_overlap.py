#!/usr/bin/env python
"""The evaluator's shared work queue against probes-after-encoding: the phase after the classification
pairs are encoded, side by side on the same ranks, interleaved repetitions.

Both arms start from the same vectors of the classification pairs (``--vectors``: a file written by
``relbert-ds-evaluate --vectors``; without it they are encoded once, untimed) and then do the same work:
the torch probes of the classification sets and the encoding of the remaining pairs of the table (the
bundled analogy sets' valid and test splits):

- ``after``: the probes, one dataset per rank (the costliest first to the least-loaded rank), then the
  remaining pairs in lockstep (the evaluator before the queue);
- ``queue``: the probes and the batches of the remaining pairs from one work queue the ranks share
  (``encode_sharing_ranks``, the evaluator now).

Reported per arm: the phase's wall time (slowest rank), each rank's probe and encoding time, the ratio
after / queue, and whether both arms gave the same probe reports and the same vectors (they must).

    python benchmarks/tools/eval_overlap.py --model runs/default/best_model --vectors <its vectors.npz>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import common  # noqa: E402

ANALOGY = ["semeval2012", "sat", "u2", "u4", "google", "bats"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--vectors", default=None, help="a --vectors file of the evaluator holding the classification "
                                                   "pairs' vectors of --model (default: encode them first, untimed)")
    p.add_argument("--classification", nargs="+", default=["BLESS", "KHN"])
    p.add_argument("--analogy", nargs="+", default=ANALOGY)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_iter", type=int, default=200)
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/eval_overlap.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def worker(args: argparse.Namespace) -> int:
    """One rank: both arms ``repeats`` times, alternating which goes first; rank 0 writes ``args._worker``."""
    import hashlib

    import torch

    from relbert_ds import RelationEncoder, evaluation
    from relbert_ds.evaluation import classification, runner
    from relbert_ds.evaluation import tasks as tasks_mod
    from relbert_ds.evaluation.classification import ProbeOptions
    from relbert_ds.evaluation.sharding import encode_sharded, encode_sharing_ranks
    from relbert_ds.parallel import distributed
    from relbert_ds.parallel.collectives import all_gather_no_grad

    info = common.setup_single_process()
    distributed.set_threads(None, info.local_world_size)
    encoder = RelationEncoder.from_pretrained(args.model)
    tasks = evaluation.prepare_tasks(analogy=args.analogy, classification=args.classification,
                                 split=["validation", "test"])
    first = tasks_mod.classification_pairs(tasks)
    in_first = set(first)
    rest = [p for p in dict.fromkeys(tasks.pairs()) if p not in in_first]
    lookup = (common.vectors_lookup(args.vectors) if args.vectors else
              runner.table_lookup(first, encode_sharded(encoder, first, batch_size=args.batch_size)))
    order = tasks_mod.probe_order(tasks)

    def comparable(reports: Sequence[dict]) -> str:
        return json.dumps([{k: v for k, v in r.items() if k not in ("time_s", "device")} for r in reports],
                          sort_keys=True)

    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for arm in (("after", "queue") if repeat % 2 == 0 else ("queue", "after")):
            distributed.barrier()
            start = time.perf_counter()
            if arm == "queue":
                jobs = classification.torch_probe_jobs(tasks.classification, lookup,
                                                       options=ProbeOptions(max_iter=args.max_iter))
                shared = encode_sharing_ranks(encoder, rest, [jobs[i] for i in order], batch_size=args.batch_size)
                reports = classification.gather_probe_reports(
                    {order[j]: r for j, r in shared.job_results.items()}, len(order))
                table, ranks = shared.table, shared.ranks
            else:
                reports = classification.run_classifications(tasks.classification, lookup,
                                                             options=ProbeOptions(max_iter=args.max_iter))
                probes_s = time.perf_counter() - start
                table = encode_sharded(encoder, rest, batch_size=args.batch_size)
                ranks = [{"probes_s": probes_s, "encode_s": time.perf_counter() - start - probes_s}]
            wall = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            walls = [float(w) for w in all_gather_no_grad(wall).tolist()]
            runs.append({"repeat": repeat, "arm": arm, "wall_s": max(walls), "rank_wall_s": walls, "ranks": ranks,
                         "reports": comparable(reports), "vectors_sha256": hashlib.sha256(table.tobytes()).hexdigest(),
                         "probe_time_s": {f"{r['dataset']}/{r['split']}": r["time_s"] for r in reports}})
    if info.rank == 0:
        Path(args._worker).write_text(json.dumps({"runs": runs, "n_first": len(first), "n_rest": len(rest),
                                                  "world_size": info.world_size}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        return worker(args)
    head = common.header("eval_overlap", argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="relbert_ds_eval_overlap_") as tmp:
        out = Path(tmp) / "runs.json"
        forwarded = list(argv if argv is not None else sys.argv[1:])
        cmd = common.launch_cmd(str(Path(__file__).resolve()), [*forwarded, "--_worker", str(out)], args.nproc)
        common.run(cmd, timeout=7200)
        doc = json.loads(out.read_text())
    runs = doc["runs"]
    after = [r["wall_s"] for r in runs if r["arm"] == "after"]
    queue = [r["wall_s"] for r in runs if r["arm"] == "queue"]
    same = len({r["reports"] for r in runs}) == 1 and len({r["vectors_sha256"] for r in runs}) == 1
    ratio = common.ratio_summary(after, queue)
    rows = [[r["repeat"], r["arm"], f"{r['wall_s']:.1f}",
             ", ".join(f"{k.split('/')[0]} {v:.1f}" for k, v in r["probe_time_s"].items()),
             " / ".join(str(s.get("batches", "lockstep")) for s in r["ranks"])] for r in runs]
    table = (common.markdown_table(["repeat", "arm", "phase wall s", "probe s", "batches per rank"], rows)
             + f"\nafter / queue: {common.fmt(ratio['median'])}x median over {len(after)} pairs of runs; "
             + f"same reports and vectors in every run: {same}; {doc['n_first']} classification pairs given, "
             + f"{doc['n_rest']} more encoded; {doc['world_size']} ranks\n")
    document = {**head, "config": vars(args), "runs": runs, "after_over_queue": ratio, "identical": same,
                "n_first": doc["n_first"], "n_rest": doc["n_rest"], "loadavg_end": common.loadavg()}
    common.emit(table, Path(args.output or common.default_output("eval_overlap")), document)
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
