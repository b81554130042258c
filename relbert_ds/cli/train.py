"""``relbert-ds-train``: parse options, run the Trainer (or print its plan), report. Launch
with deepspeed, torchrun, mpirun, srun or plain python (see README)."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from relbert_ds.training.config import RunConfig, parse_train_command


def _train(run: RunConfig) -> int:
    from relbert_ds.parallel import distributed

    if run.train.dry_run:
        from relbert_ds.training.dry_run import print_plan

        print_plan(run)
        return 0
    from relbert_ds.training.trainer import PREEMPTED_EXIT_CODE, Trainer

    result = Trainer(run).fit()
    if distributed.is_main():
        summary = {"output_dir": result.output_dir, "final_model": result.final_model,
                   "best_model": result.best_model, "best_epoch": result.best_epoch,
                   "best_step": result.best_step, "best_score": result.best_metric,
                   "optimizer_steps": result.optimizer_steps, "skipped_updates": result.skipped_updates,
                   "preempted": result.preempted}
        print(json.dumps(summary), flush=True)
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a training job; returns the exit status (0, 2 for a user error, 3 when training diverged, 124 when
    pre-empted)."""
    from relbert_ds.cli.common import run_command

    return run_command(argv, parse_train_command, lambda cmd: _train(cmd.run), verbose=lambda cmd: cmd.verbose)


def run() -> None:
    """Console-script entry point: ``main()`` then a clean process exit (see common.exit_process)."""
    from relbert_ds.cli.common import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
