"""Draw the benchmark results into docs/figures/ (what the README shows).

    python benchmarks/make_figures.py            # reads benchmarks/results/*.json

- time_to_quality.json -> time_to_quality.png: accuracy against each arm's clock, every arm (the real
  relbert 2.0.2 trainer, relbert-ds, the re-implemented public scheme);
- memory.json -> memory.png: model-state memory per GPU by ZeRO scheme, and the measured CPU runs;
- train_throughput.json -> throughput.png: tokens/s, MFU and epoch time per arm, negatives per
  encoded prompt by ranks.

A result file that is missing is skipped with a note; the rest are drawn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relbert_ds.training.plotting import plot_memory, plot_throughput, plot_time_to_quality  # noqa: E402

FIGURES = (("time_to_quality.json", "time_to_quality.png", plot_time_to_quality),
           ("memory.json", "memory.png", plot_memory),
           ("train_throughput.json", "throughput.png", plot_throughput))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the result JSONs")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="where to write the PNGs")
    args = p.parse_args(argv)
    for source, target, draw in FIGURES:
        path = Path(args.results) / source
        if not path.is_file():
            print(f"skipped {target}: no {path}", file=sys.stderr)
            continue
        print(draw(path, Path(args.out) / target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
