"""``relbert-ds-plot RUN_DIR [--out DIR]``: PNG figures of a training run from its history.jsonl.

    relbert-ds-plot runs/default                 # -> runs/default/figures/*.png
    relbert-ds-plot runs/default --out figs/

Writes loss.png, lr.png, throughput.png (pairs/s and MFU), validation.png (analogy accuracy per
epoch or evaluation) and overview.png (all four). Errors are one ``error:`` line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from relbert_ds.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relbert-ds-plot", description=(
        "Draw a relbert-ds training run: loss, learning rate, pairs/s and MFU per optimizer step, and the "
        "validation analogy accuracy per epoch or evaluation, as PNG files."))
    p.add_argument("run_dir", help="the run directory (--output_dir of the training run) or its history.jsonl")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default RUN_DIR/figures)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Draw the figures; returns the exit code (0, or 2 for a user error)."""
    args = build_parser().parse_args(argv)
    from relbert_ds.training.plotting import plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    for path in paths:
        print(path)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
