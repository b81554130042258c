#!/usr/bin/env python
"""Two versions of the probe kernel (``relbert_ds/evaluation/probe.py``) side by side on the same
vectors: whole fits of the evaluator's torch probe, alternately one version then the other, per seed.

What a kernel change needs before it lands: the same grid picks, epochs and predictions (or an
explanation of why not) and its CPU time next to the old one's under the same machine state. Each
fit is ``classification.run_classification`` (features, grid, selection, report) with the kernel
module swapped in, one thread; CPU seconds of the whole call. Versions are files (a ``probe.py``
from another commit: ``git show <rev>:relbert_ds/evaluation/probe.py > /tmp/old_probe.py``);
``current`` is the installed one. The host's noise is +-10%: compare the per-seed ratios and
repeat rather than trust one run.

    git show 3cc9660:relbert_ds/evaluation/probe.py > /tmp/probe_3cc9660.py
    python benchmarks/tools/probe_kernel_ab.py --vectors runs/probe_table/trained.npz --dataset BLESS \\
        --seeds 0 1 2 --kernels /tmp/probe_3cc9660.py current
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", required=True,
                   help="vectors file (arrays pairs and model_vectors, as eval_throughput.py --probe_table writes it)")
    p.add_argument("--dataset", default="BLESS", help="bundled classification set name or a folder (default BLESS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--kernels", nargs="+", default=["current"],
                   help="probe.py files to compare, or 'current' (the installed kernel); the first is the reference")
    p.add_argument("--protocol", default="fast", choices=("fast", "paper"))
    p.add_argument("--max_iter", type=int, default=200)
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/probe_kernel_ab.json)")
    return p


def load_kernel(spec: str, index: int) -> ModuleType:
    """The probe module named by ``spec``: the installed one for ``current``, else the file, loaded under its own
    module name so that versions do not replace each other."""
    if spec == "current":
        from relbert_ds.evaluation import probe

        return probe
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--kernels: {spec} is not a file (give a probe.py, e.g. from git show, or 'current')")
    module_spec = importlib.util.spec_from_file_location(f"_probe_kernel_{index}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    _accept_points(module)
    return module


def _accept_points(module: ModuleType) -> None:
    """Kernels older than 2026-12-01 predict every grid point at once; the evaluator now asks
    ``FittedGrid.predict(x, points=[i])`` for the chosen point only. Give such a kernel that argument (it
    predicts all and keeps the ones asked for: the same numbers, a little more time)."""
    predict = module.FittedGrid.predict
    if "points" in inspect.signature(predict).parameters:
        return

    def predict_points(self: Any, x: Any, device: Any = None, points: Optional[Sequence[int]] = None) -> Any:
        out = predict(self, x, device)
        return out if points is None else out[list(points)]

    module.FittedGrid.predict = predict_points


def fit_with(kernel: ModuleType, dataset: Any, lookup: Any, seed: int, protocol: str, max_iter: int) -> dict:
    """One whole probe of ``dataset`` with ``kernel`` as the evaluator's probe module; CPU seconds added."""
    from relbert_ds.evaluation import classification
    from relbert_ds.evaluation.classification import ProbeOptions

    before = classification.probe_mod
    classification.probe_mod = kernel
    try:
        start = time.process_time()
        options = ProbeOptions(max_iter=max_iter, seed=seed, probe="torch", protocol=protocol)
        result = classification.run_classification(dataset, lookup, options=options, keep_predictions=True)
        result["cpu_s"] = time.process_time() - start
    finally:
        classification.probe_mod = before
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    import torch

    from relbert_ds.data import load_classification_dataset

    torch.set_num_threads(1)  # the evaluator's probe runs on one thread per rank
    kernels = [load_kernel(spec, i) for i, spec in enumerate(args.kernels)]
    lookup = common.vectors_lookup(args.vectors)
    dataset = load_classification_dataset(args.dataset)
    document = common.header("probe_kernel_ab", argv)
    document["config"] = vars(args)
    for kernel in kernels:  # warm-up, untimed: the first fit of a process also pays for first-call set-up
        fit_with(kernel, dataset, lookup, args.seeds[0], args.protocol, 1)
    runs: list[dict] = []
    rows = []
    for seed in args.seeds:
        results = []
        for spec, kernel in zip(args.kernels, kernels):  # alternately: both versions see the same machine state
            result = fit_with(kernel, dataset, lookup, seed, args.protocol, args.max_iter)
            predictions = [p["prediction"] for p in result.pop("predictions")]
            results.append((result, predictions))
            runs.append({"seed": seed, "kernel": spec, "cpu_s": result["cpu_s"], "f1_macro": result["f1_macro"],
                         "config": result["config"], "n_iter": [g["n_iter"] for g in result["grid"]],
                         "predictions_sha1": _digest(predictions)})
            print(f"seed {seed} {spec}: macro F1 {100 * result['f1_macro']:.2f} in {result['cpu_s']:.1f} CPU s",
                  flush=True)
        (reference, reference_predictions) = results[0]
        for spec, (result, predictions) in zip(args.kernels, results):
            same = (predictions == reference_predictions
                    and [g["n_iter"] for g in result["grid"]] == [g["n_iter"] for g in reference["grid"]])
            rows.append([seed, spec, 100 * result["f1_macro"], result["config"]["hidden_layer_sizes"],
                         f'{result["config"]["learning_rate_init"]:g}', result["n_iter"], result["cpu_s"],
                         reference["cpu_s"] / result["cpu_s"], "yes" if same else "NO"])
    document["runs"] = runs
    document["speedup_vs_first"] = {
        spec: common.ratio_summary([r["cpu_s"] for r in runs if r["kernel"] == args.kernels[0]],
                                   [r["cpu_s"] for r in runs if r["kernel"] == spec])
        for spec in args.kernels}
    table = common.markdown_table(
        ["seed", "kernel", "test macro F1", "hidden", "lr", "epochs of the pick", "CPU s",
         "speed-up vs the first", "same epochs and predictions as the first"], rows)
    common.emit(table, Path(args.output) if args.output else common.default_output("probe_kernel_ab"), document)


def _digest(predictions: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(predictions).encode("utf-8")).hexdigest()


if __name__ == "__main__":
    main()
