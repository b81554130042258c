#!/usr/bin/env python
"""How the fast probe protocol's schedule was chosen: every grid point's validation and test macro F1
after every epoch, then candidate schedules replayed on those curves.

One run of the paper protocol (``probe.fit_grid`` without pruning, so every point trains to sklearn's
stopping rule) per dataset, recording the validation and test curves. A schedule is then replayed
without training again:

- ``paper``: select the best final validation F1 (what ``--probe_protocol paper`` reports);
- ``halving a,b``: successive halving, 9 -> 3 points after epoch ``a`` and -> 1 after ``b`` by best
  validation F1 so far, the kept points trained on as in ``paper`` (what ``--probe_protocol fast``
  does with ``FAST_PRUNE_AT = (a, b)``);
- ``early stop p``: each point stopped once its validation F1 has not improved for more than ``p``
  epochs, its best epoch kept (sklearn's ``early_stopping`` rule on the validation split).

Cost is in grid-point epochs weighted by hidden width (what the matrix products scale with), as a
ratio to ``paper``. Input: a vectors file (arrays ``pairs`` and ``model_vectors``, as
``eval_throughput.py --probe_table`` or ``relbert-ds-evaluate --vectors`` write it).

    python benchmarks/tools/probe_schedule.py --vectors runs/probe_table/backbone.npz --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import common  # noqa: E402

HALVINGS = ((3, 10), (5, 15), (5, 20), (10, 30))
PATIENCES = (5, 10)


def curves(vectors: str, source: str, seed: int) -> dict:
    """The paper protocol on one dataset with validation and test macro F1 recorded per epoch."""
    import numpy as np
    import torch

    from relbert_ds.data import load_classification_dataset
    from relbert_ds.evaluation import classification, probe

    torch.set_num_threads(1)
    lookup = common.vectors_lookup(vectors)
    dataset = load_classification_dataset(source)
    code = {label: i for i, label in enumerate(dataset.labels)}

    def split(name: str) -> tuple[Any, Any]:
        pairs = dataset.splits[name]
        features = classification.pair_features(pairs, lookup)
        return features, np.array([code[p.relation] for p in pairs], dtype=np.int64)

    (x, y), val, test = split("train"), split("validation"), split("test")
    points = [probe.GridPoint(c["hidden_layer_sizes"], c["learning_rate_init"]) for c in classification.search_grid()]
    with common.Phase() as phase:
        grid = probe.fit_grid(x, y, points, len(dataset.labels), seed=seed, validation=val, monitor={"test": test})
    return {"dataset": dataset.name, "seed": seed, "points": [[p.hidden, p.learning_rate] for p in points],
            "n_iter": grid.n_iter, "validation": grid.validation_curves, "test": grid.monitor_curves["test"],
            "seconds": phase.record["seconds"]}


def replay(run: dict, halving: Optional[Sequence[int]] = None, patience: Optional[int] = None) -> dict:
    """Test macro F1 of the selected point and the cost of one schedule, replayed on recorded curves."""
    widths = [h for h, _ in run["points"]]
    count = len(widths)
    stop = list(run["n_iter"])  # epochs each point trains
    kept = [n - 1 for n in stop]  # index of the epoch whose weights are reported
    if patience is not None:
        for i, curve in enumerate(run["validation"]):
            best, stale = -1.0, 0
            for epoch, score in enumerate(curve):
                stale = stale + 1 if score < best + 1e-4 else 0
                if score > best:
                    best, kept[i] = score, epoch
                if stale > patience:
                    stop[i] = epoch + 1
                    break
    running = list(range(count))
    for cut in halving or ():
        ranked = sorted(running, key=lambda i: (-max(run["validation"][i][:min(cut, stop[i])]), i))
        running = ranked[:max(1, -(-len(ranked) // 3))]
        for i in ranked[len(running):]:
            if stop[i] > cut:
                stop[i], kept[i] = cut, cut - 1
    chosen = max(range(count), key=lambda i: (run["validation"][i][kept[i]], -i))
    return {"test_f1_macro": 100 * run["test"][chosen][kept[chosen]], "chosen": run["points"][chosen],
            "cost": sum(s * w for s, w in zip(stop, widths))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", required=True, help="npz with arrays pairs and model_vectors")
    p.add_argument("--label", default="backbone", help="name of the vectors' model in the output")
    p.add_argument("--classification", nargs="+", default=["BLESS", "KHN"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/probe_schedule.json)")
    args = p.parse_args(argv)
    head = common.header("probe_schedule", argv if argv is not None else sys.argv[1:])
    rows, runs = [], []
    for source in args.classification:
        run = curves(args.vectors, source, args.seed)
        runs.append(run)
        paper = replay(run)
        schedules = [("paper", {})] + [(f"halving {a},{b}", {"halving": (a, b)}) for a, b in HALVINGS] + [
            (f"early stop {n}", {"patience": n}) for n in PATIENCES]
        for name, kwargs in schedules:
            r = replay(run, **kwargs)
            rows.append([args.label, run["dataset"], name, f"{r['test_f1_macro']:.2f}",
                         f"{r['test_f1_macro'] - paper['test_f1_macro']:+.2f}", f"{r['chosen'][0]}, {r['chosen'][1]:g}",
                         f"{paper['cost'] / r['cost']:.1f}x"])
    table = ("Schedules replayed on the paper protocol's recorded curves (test macro F1 of the selected point; "
             f"seed {args.seed}; cost = epochs x hidden width):\n"
             + common.markdown_table(["model", "dataset", "schedule", "test F1", "vs paper", "chosen (hidden, lr)",
                                      "less work"], rows))
    path = Path(args.output or common.default_output("probe_schedule"))
    document = json.loads(path.read_text()) if path.is_file() else {}
    document[f"{args.label}_seed{args.seed}"] = {**head, "runs": runs, "table_markdown": table}
    common.write_json(path, document)
    print(table, flush=True)
    print(f"results: {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
