#!/usr/bin/env python
"""Step time of the embedded default training job per launch path, on this machine's CPU ranks.

Every path starts the real ``launchers/train.py`` with no model or data options (the bundled
all-MiniLM-L6-v2 on the bundled SemEval-2012, ZeRO-2 from ``ds_configs/zero2.json``, 8 relations
per rank x (8 positives + 8 negatives)) for ``--steps`` optimizer steps, without validation:

- ``deepspeed``: ``deepspeed --num_gpus N``;
- ``torchrun``: ``torchrun --nproc_per_node N``;
- ``mpirun``: the venv's ``mpirun -np N python -m mpi4py`` (pip's MPICH, ``relbert-ds[mpi]``);
- ``srun-env``: N plain processes given the variables srun sets (``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_STEP_NUM_TASKS``, the node list, the job id), as srun starts them;
- ``python``: one process, world size 1 (so half the global batch of the 2-rank paths).

Reported per path: the median optimizer-step time of steps 2.. (the first includes warm-up of
the allocator and DeepSpeed's buckets), pairs/s, and the process wall time (start-up, the steps,
the checkpoint and the export), with the machine's load average. The paths run one after the
other, repeated ``--repeats`` times in rotating order so that a busy minute does not land on one
path only.

    python benchmarks/launch_paths.py                      # 12 steps per run, 1 repetition
    python benchmarks/launch_paths.py --steps 20 --repeats 2
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import slurm_job_id_with_free_port  # noqa: E402

PATHS = ("deepspeed", "torchrun", "mpirun", "srun-env", "python")
TRAIN = "launchers/train.py"


def run_path(path: str, nproc: int, run_dir: Path, steps: int, extra: Sequence[str]) -> dict[str, Any]:
    """Train ``steps`` steps through one launch path; the step records and the process wall time."""
    args = ["--deepspeed_config", "ds_configs/zero2.json", "--output_dir", str(run_dir), "--overwrite",
            "--max_steps", str(steps), "--metric", "none", "--analogy", "--no-projector", "--keep_last", "1", *extra]
    load_before = common.loadavg()
    start = time.perf_counter()
    if path in ("deepspeed", "torchrun", "python"):
        common.run(common.launch_cmd(TRAIN, args, 1 if path == "python" else nproc, path), timeout=1800)
    elif path == "mpirun":
        common.run([common.tool("mpirun"), "-np", str(nproc), sys.executable, "-m", "mpi4py", TRAIN, *args],
                   timeout=1800)
    elif path == "srun-env":
        job = slurm_job_id_with_free_port()
        procs = []
        for rank in range(nproc):
            env = common.rank_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS=str(nproc),
                                  SLURM_NTASKS=str(nproc), SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1",
                                  SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job))
            procs.append(subprocess.Popen([sys.executable, TRAIN, *args], cwd=str(common.REPO), env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        for p in procs:
            _, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"srun-env rank failed with exit {p.returncode}:\n{err[-4000:]}")
    else:
        raise ValueError(f"unknown path {path!r}")
    wall = time.perf_counter() - start
    records, _ = common.read_history(run_dir)
    timed = [r for r in records if r.get("kind") == "step" and r["optimizer_step"] >= 2] or records
    return {"path": path, "world_size": 1 if path == "python" else nproc, "wall_s": wall,
            "step_s": [r["step_seconds"] for r in timed], "pairs_per_s": [r["pairs_per_s"] for r in timed],
            "loadavg_before": load_before, "loadavg_after": common.loadavg()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the multi-rank paths (default 2)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work_dir", default="runs/benchmarks/launch_paths")
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/launch_paths.json)")
    p.add_argument("train_args", nargs="*", help="extra train.py options after --, e.g. -- --model <tiny model>")
    args = p.parse_args(argv)
    head = common.header("launch_paths", sys.argv[1:])
    runs: dict[str, list[dict]] = {path: [] for path in args.paths}
    for repeat in range(args.repeats):
        order = args.paths[repeat % len(args.paths):] + args.paths[:repeat % len(args.paths)]
        for path in order:
            runs[path].append(run_path(path, args.nproc, Path(args.work_dir) / path, args.steps, args.train_args))
    rows, summary = [], {}
    for path, results in runs.items():
        steps = [s for r in results for s in r["step_s"]]
        pairs = [x for r in results for x in r["pairs_per_s"]]
        walls = [r["wall_s"] for r in results]
        summary[path] = {"world_size": results[0]["world_size"], "median_step_s": statistics.median(steps),
                         "median_pairs_per_s": statistics.median(pairs), "median_wall_s": statistics.median(walls),
                         "steps_timed": len(steps)}
        rows.append([path, results[0]["world_size"], summary[path]["median_step_s"],
                     summary[path]["median_pairs_per_s"], summary[path]["median_wall_s"]])
    table = common.markdown_table(["launch path", "ranks", "step time (s, median)", "pairs/s", "process wall (s)"],
                                  rows, digits=2)
    note = (f"\n{args.steps} optimizer steps per run, steps 2..{args.steps} timed, {args.repeats} repetition(s); "
            f"the embedded default job (bundled backbone and data, ZeRO-2, fp32 on CPU) unless options were given.\n")
    common.emit(table + note, Path(args.output or common.default_output("launch_paths")),
                {**head, "config": vars(args), "summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
