#!/usr/bin/env python
"""The REAL public relbert 2.0.2 trainer as a benchmark arm, driven step by step from relbert-ds.

Three pieces: ``relbert_venv.py`` builds relbert's own virtual environment with offline loading scripts
for relbert-ds's bundled data and a backbone transformers 4.21 can read; ``relbert_driver.py`` runs
inside it, calls relbert's own ``relbert-train`` and pauses it after each optimizer step; this module is
the arm (:class:`RealArm`, :class:`RealTrainer`) that starts the driver with :func:`relbert_train_args`,
steps it, saves checkpoints with relbert's own ``RelBERT.save`` and scores them with
``relbert_ds.RelationEncoder.from_pretrained`` and the same SemEval-2012 validation questions as the
other arms.

Every run is bounded: a time budget, a step limit, a per-command timeout; the child is killed
with its process group when the parent stops.

Measure once (builds the venv if needed, runs a few real steps, scores a checkpoint)::

    python benchmarks/public_relbert.py --steps 3 --output benchmarks/results/public_relbert_smoke.json

The three-arm time-to-quality run. The arms take turns, so the wall time is the sum of the
budgets: about 45 minutes of an otherwise idle 2-core machine (the real arm needs ~23 minutes
for its first epoch of 79 steps at 16.9 s, docs/PERFORMANCE.md; its venv build, ~3 minutes once,
is not counted)::

    python benchmarks/time_to_quality.py --real_budget_min 26 --public_budget_min 15 --ours_budget_min 4

Seconds per step of the real trainer next to ours (``--real_steps`` per repetition)::

    python benchmarks/train_throughput.py --repeats 3 --real_steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.relbert_venv import (  # noqa: E402
    DEFAULT_VENV,
    convert_backbone,
    ensure_venv,
    offline_env,
    venv_python,
    write_loading_scripts,
)

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().with_name("relbert_driver.py")
DEFAULT_WORK = REPO / "runs" / "benchmarks" / "public_relbert"

# relbert-train's recipe of the public trainer's reference run (nce, 10 positives, 400 negatives, warm-up 10,
# batch 32; docs/PERFORMANCE.md).
TEMPLATE_D = ("I wasn\u2019t aware of this relationship, but I just read in the encyclopedia that <subj> is the "
              "<mask> of <obj>")


# --------------------------------------------------------------------------- the command line


def relbert_train_args(backbone: Path | str, output_dir: Path | str, lr: float = 2e-5, epochs: int = 100,
                       num_positive: int = 10, num_negative: int = 400, batch: int = 32, seed: int = 0,
                       max_length: int = 64, template: str = TEMPLATE_D) -> list[str]:
    """``relbert-train``'s options for the recipe of the public trainer's reference run (the arm's settings).

    ``epochs`` is only an upper bound: the benchmark stops the run by its own budget.
    """
    return ["-o", str(output_dir), "-m", str(backbone), "-t", template, "-l", str(max_length), "-e", str(epochs),
            "-b", str(batch), "-s", str(seed), "-r", str(lr), "-w", "10", "--aggregation-mode", "average_no_mask",
            "--loss", "nce", "--temperature", "0.05", "--num-positive", str(num_positive),
            "--num-negative", str(num_negative), "--gradient-accumulation", "1", "--epoch-save", "1"]


def relbert_train_shell(backbone: Path | str, output_dir: Path | str, **recipe: Any) -> str:
    """The same as a shell command line (quoted), for reports and docs."""
    return shlex.join(["relbert-train", *relbert_train_args(backbone, output_dir, **recipe)])


def driver_command(python: Path | str, train_args: Sequence[str], threads: int) -> list[str]:
    """The relbert venv's python running benchmarks/relbert_driver.py, the step-by-step driver of relbert-train."""
    return [str(python), str(DRIVER), "--threads", str(threads), "--", *train_args]


# --------------------------------------------------------------------------- parent side


class RealTrainer:
    """relbert-train in the relbert venv, advanced one optimizer step per :meth:`step`.

    Every call waits at most ``timeout_s``; on any failure, and in :meth:`close`, the child's
    process group is killed. ``work_dir`` gets ``hub/`` (the loading scripts, relbert's working
    directory), ``run/`` (relbert's output dir), ``datasets_cache/`` and ``relbert.log``.
    """

    def __init__(self, python: Path | str, backbone: Path | str, work_dir: Path | str, lr: float = 2e-5,
                 threads: int = 1, num_positive: int = 10, num_negative: int = 400, timeout_s: float = 900) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.hub_dir = self.work_dir / "hub"
        self.run_dir = self.work_dir / "run"
        self.log_path = self.work_dir / "relbert.log"
        self.timeout_s = timeout_s
        self.train_args = relbert_train_args(Path(backbone).resolve(), self.run_dir, lr=lr, num_positive=num_positive,
                                             num_negative=num_negative)
        self.command = driver_command(python, self.train_args, threads)
        self.proc: Optional[subprocess.Popen] = None
        self.steps = 0
        self._buffer = b""

    def start(self) -> dict[str, Any]:
        """Start relbert-train; return when its data are tokenized (its ``ready`` event)."""
        write_loading_scripts(self.hub_dir)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     cwd=str(self.hub_dir), start_new_session=True,
                                     env=offline_env(HF_DATASETS_CACHE=str(self.work_dir / "datasets_cache")))
        return self._expect("ready")

    def step(self) -> dict[str, Any]:
        """One relbert optimizer step; its record (seconds measured in the child, loss, lr, tokens)."""
        self._send("step")
        record = self._expect("step")
        self.steps = record["step"]
        return record

    def save(self, path: Path | str) -> dict[str, Any]:
        """``RelBERT.save`` of the model as it is now, into ``path``."""
        self._send(f"save {Path(path).resolve()}")
        return self._expect("saved")

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self._send("stop")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, RuntimeError):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self._log.close()

    def __enter__(self) -> "RealTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def _expect(self, event: str) -> dict[str, Any]:
        """Read the child's next event line; it must be ``event``. Fails on timeout or exit."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail(f"no '{event}' from relbert-train within {self.timeout_s:.0f} s")
                if sel.select(timeout=min(left, 5.0)):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        self._fail(f"relbert-train exited (code {self.proc.wait()}) before '{event}'")
                    self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        record = json.loads(line)
        if record.get("event") != event:
            self._fail(f"expected '{event}' from relbert-train, got {record}")
        return record

    def _fail(self, message: str) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.flush()
        tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
        raise RuntimeError(f"{message}; log {self.log_path}:\n{tail}")


def score_checkpoint(folder: Path | str, questions: Any, score: Callable[[Any, Any], float]) -> float:
    """Load relbert's saved folder with relbert-ds and score it with the other arms' code."""
    from relbert_ds import RelationEncoder

    return score(RelationEncoder.from_pretrained(str(folder)), questions)


class RealArm:
    """The benchmarks' handle on the real trainer: set-up, steps, validation, each a timed unit."""

    def __init__(self, venv: Path | str, work_dir: Path | str, lr: float, threads: int, num_positive: int = 10,
                 num_negative: int = 400, timeout_s: float = 900, log: Callable[[str], None] = print,
                 model: str = "all-MiniLM-L6-v2") -> None:
        self.venv = Path(venv)
        self.work_dir = Path(work_dir)
        self.model = model
        self.settings = {"lr": lr, "threads": threads, "num_positive": num_positive, "num_negative": num_negative,
                         "timeout_s": timeout_s}
        self.log = log
        self.venv_stamp: Optional[dict[str, Any]] = None
        self.trainer: Optional[RealTrainer] = None
        self.checkpoint_io_s = 0.0

    def prepare(self) -> dict[str, Any]:
        """Build the venv if needed (not timed as the arm's work) and convert the backbone."""
        from relbert_ds.model.backbones import resolve_model_name

        self.venv_stamp = ensure_venv(self.venv, log=self.log)
        convert_backbone(self.work_dir / "backbone", resolve_model_name(self.model))
        return self.venv_stamp

    def start(self) -> dict[str, Any]:
        s = self.settings
        self.trainer = RealTrainer(venv_python(self.venv), self.work_dir / "backbone", self.work_dir, lr=s["lr"],
                                   threads=s["threads"], num_positive=s["num_positive"],
                                   num_negative=s["num_negative"], timeout_s=s["timeout_s"])
        return self.trainer.start()

    def step(self) -> dict[str, Any]:
        assert self.trainer is not None
        return self.trainer.step()

    def validate(self, questions: Any, score: Callable[[Any, Any], float]) -> float:
        """Save the model with relbert's own save, read it back with relbert-ds, score it, delete it."""
        assert self.trainer is not None
        folder = self.work_dir / f"validate_step_{self.trainer.steps}"
        t = time.perf_counter()
        self.trainer.save(folder)
        from relbert_ds import RelationEncoder

        encoder = RelationEncoder.from_pretrained(str(folder))
        self.checkpoint_io_s += time.perf_counter() - t
        accuracy = score(encoder, questions)
        shutil.rmtree(folder, ignore_errors=True)
        return accuracy

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None


# --------------------------------------------------------------------------- the measurement


def measure(args: argparse.Namespace) -> int:
    """Build (or reuse) the venv, run ``--steps`` real steps, score the model before and after."""
    from benchmarks import common
    from benchmarks.arms import accuracy, semeval_questions

    head = common.header("public_relbert", args.argv)
    threads = args.threads or os.cpu_count() or 1
    arm = RealArm(args.venv, args.work_dir, lr=args.lr, threads=threads, timeout_s=args.timeout_s,
                  log=lambda m: print(m, file=sys.stderr, flush=True), model=args.model,
                  num_negative=args.negatives)
    stamp = arm.prepare()
    questions = semeval_questions()
    budget_end = time.perf_counter() + args.budget_min * 60
    t = time.perf_counter()
    ready = arm.start()
    setup_wall = time.perf_counter() - t
    records, scores = [], {}
    try:
        t = time.perf_counter()
        scores[0] = arm.validate(questions, accuracy)
        validate_s = time.perf_counter() - t
        while len(records) < args.steps and time.perf_counter() < budget_end:
            t = time.perf_counter()
            record = arm.step()
            records.append({**record, "parent_seconds": time.perf_counter() - t})
            print(f"relbert step {record['step']}: {record['seconds']:.1f} s, loss {record['loss']:.2f}",
                  file=sys.stderr, flush=True)
        scores[len(records)] = arm.validate(questions, accuracy)
    finally:
        arm.close()
    from relbert_ds import RelationEncoder

    zero_shot_ours = accuracy(RelationEncoder.from_pretrained(args.model, warn_untrained=False), questions)
    step_s = common.summary(r["seconds"] for r in records[1:] or records)  # the first step warms up
    table = common.markdown_table(
        ["what", "value"],
        [["relbert venv build (min)", stamp["created_s"] / 60 if stamp.get("created_s") else None],
         ["venv built by this run", stamp["built_now"]],
         ["relbert-train set-up to first step (s: model load + tokenization)", ready["setup_s"]],
         ["real steps run", len(records)],
         ["seconds per step, median [min-max] (first step excluded)",
          f"{step_s['median']:.1f} [{step_s['min']:.1f}-{step_s['max']:.1f}]"],
         ["sequences per step", records[-1]["sequences"] if records else None],
         ["epoch of 79 steps, extrapolated (min)", step_s["median"] * 79 / 60],
         ["SemEval-2012 val. analogy %, relbert's untrained model, read by relbert-ds", 100 * scores[0]],
         ["same, relbert-ds's own load of the backbone", 100 * zero_shot_ours],
         [f"SemEval-2012 val. analogy % after {len(records)} real steps", 100 * scores[len(records)]]], digits=2)
    table += (f"\nShared 2-core machine (other jobs running: see the load averages), {threads} torch threads in "
              f"relbert's process; the venv build time depends on that load too.\n")
    document = {**head, "config": {k: v for k, v in vars(args).items() if k != "argv"}, "venv": stamp,
                "relbert_ready": ready, "setup_wall_s": setup_wall, "validate_s": validate_s, "steps": records,
                "step_seconds": step_s, "epoch_minutes_extrapolated": step_s["median"] * 79 / 60,
                "accuracy": {"relbert_untrained_read_by_relbert_ds": scores[0],
                             "relbert_ds_backbone": zero_shot_ours,
                             f"after_{len(records)}_steps": scores[len(records)]},
                "driver_command": arm_command_for_docs(args), "log": str(Path(args.work_dir) / "relbert.log")}
    common.emit(table, Path(args.output), document)
    return 0


def arm_command_for_docs(args: argparse.Namespace) -> str:
    return relbert_train_shell(Path(args.work_dir) / "backbone", Path(args.work_dir) / "run", lr=args.lr,
                               num_negative=args.negatives)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", default=str(DEFAULT_VENV), help="the relbert venv (built on first use)")
    p.add_argument("--work_dir", default=str(DEFAULT_WORK))
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="relbert-ds's name of the same backbone")
    p.add_argument("--steps", type=int, default=3, help="real optimizer steps to time")
    p.add_argument("--budget_min", type=float, default=10.0, help="no step starts after this many minutes")
    p.add_argument("--timeout_s", type=float, default=900, help="longest wait for any one reply of relbert")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--negatives", type=int, default=400, help="relbert-train --num-negative (default 400)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of relbert's process (default: all)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "public_relbert_smoke.json"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
