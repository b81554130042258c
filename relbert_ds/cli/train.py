"""``train.py``: parse options, run the Trainer, report. Launch with deepspeed, torchrun,
mpirun, srun or plain python (see README)."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from relbert_ds.config import build_train_parser, run_config_from_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_train_parser().parse_args(argv)
    from relbert_ds.cli.common import run_main, setup_logging

    setup_logging(args.verbose)
    run = run_config_from_args(args)

    def body() -> int:
        from relbert_ds import distributed
        from relbert_ds.trainer import PREEMPTED_EXIT_CODE, Trainer

        result = Trainer(run).fit()
        if distributed.is_main():
            summary = {"output_dir": result.output_dir, "final_model": result.final_model,
                       "best_model": result.best_model, "best_epoch": result.best_epoch,
                       "best_score": result.best_metric, "optimizer_steps": result.optimizer_steps,
                       "preempted": result.preempted}
            print(json.dumps(summary), flush=True)
        return PREEMPTED_EXIT_CODE if result.preempted else 0

    return run_main(body)


def run() -> None:
    """Console-script entry point: ``main()`` then a clean process exit (see common.exit_process)."""
    from relbert_ds.cli.common import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
