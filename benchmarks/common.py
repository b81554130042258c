"""What every benchmark shares: the results header (machine, versions, load average), statistics
of interleaved repetitions, markdown tables, JSON writing, and launching real ranks.

Timings on a shared machine are noisy, so the benchmarks never report a lone wall time as
the result: two arms run interleaved (A B A B ...) in one invocation and the figure is the
ratio, per repetition, with its median and spread. ``os.getloadavg()`` is recorded before and
after each measured phase so that a reader can judge how busy the machine was.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent


# relbert_ds (and with it torch) is imported where it is used, not here: the GPU check's driver uses this
# module and must hold no CUDA context, so it imports no torch at all.


def free_port() -> int:
    """A free local TCP port (the one copy, in relbert_ds.parallel.distributed)."""
    from relbert_ds.parallel.distributed import free_port as _free_port

    return _free_port()


def read_history(run_dir: Path | str) -> Any:
    """A run's history.jsonl as (step records, evaluation records): the one reader, in run_directory."""
    from relbert_ds.training.run_directory import read_history as _read_history

    return _read_history(run_dir)


# --------------------------------------------------------------------------- context


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (rounded), or [] where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU/GPU, cores, memory, library versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": _cpu_model()}
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    for name in ("torch", "deepspeed", "transformers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - an optional library that fails to import is just not listed
            info[name] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(benchmark: str, argv: Optional[Sequence[str]] = None,
           machine_info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The common top of every results JSON. ``machine_info``: :func:`machine` as a child process
    measured it (a driver that must not import torch itself passes it in)."""
    if machine_info is None:
        import relbert_ds

        machine_info = {**machine(), "relbert_ds_version": relbert_ds.__version__}
    return {"benchmark": benchmark,
            "command": "python " + " ".join([f"benchmarks/{benchmark}.py",
                                              *(argv if argv is not None else sys.argv[1:])]),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "relbert_ds_version": machine_info.get("relbert_ds_version"), "git_commit": git_commit(),
            "machine": {k: v for k, v in machine_info.items() if k != "relbert_ds_version"},
            "loadavg_start": loadavg()}


# --------------------------------------------------------------------------- statistics


def vectors_lookup(path: Path | str) -> Callable[[Sequence[Any]], Any]:
    """pairs -> rows of the vector table in ``path`` (arrays ``pairs`` and ``model_vectors``, as
    ``relbert-ds-evaluate --vectors`` and ``eval_throughput.py --probe_table`` write it)."""
    import numpy as np

    from relbert_ds.evaluation.runner import table_lookup

    data = np.load(path)
    return table_lookup(data["pairs"].tolist(), data["model_vectors"])


def summary(values: Iterable[float]) -> dict[str, float]:
    """median, min, max, mean and count of ``values`` (NaN-free)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return {"n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan"), "mean": float("nan")}
    return {"n": len(v), "median": statistics.median(v), "min": min(v), "max": max(v), "mean": statistics.fmean(v)}


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Per-repetition ratios a_i / b_i (the arms of one repetition ran back to back) summarised."""
    if len(numerators) != len(denominators):
        raise ValueError("one denominator per numerator is needed")
    return summary(a / b for a, b in zip(numerators, denominators) if b)


class Phase:
    """Times a block and records the load average before and after it.

    >>> with Phase() as p: ...
    >>> p.record  # {"seconds": ..., "loadavg_before": [...], "loadavg_after": [...]}
    """

    def __enter__(self) -> "Phase":
        self.record: dict[str, Any] = {"loadavg_before": loadavg()}
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.record["seconds"] = time.perf_counter() - self.start
        self.record["loadavg_after"] = loadavg()


# --------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c, digits) for c in row) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def write_json(path: Path | str, document: dict[str, Any]) -> Path:
    """Write ``document`` (NaN -> null) atomically; add ``loadavg_end``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**document, "loadavg_end": loadavg()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(document), indent=2) + "\n")
    tmp.replace(path)
    return path


def default_output(name: str) -> Path:
    return RESULTS / f"{name}.json"


def emit(table: str, path: Path, document: dict[str, Any]) -> None:
    """Print the markdown table and write the JSON (with the table in it)."""
    write_json(path, {**document, "table_markdown": table})
    print(table, flush=True)
    print(f"results: {path}", flush=True)


# --------------------------------------------------------------------------- processes


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it. torchrun and MPICH's Hydra put each rank into a
    session of its own, so the launcher's process group alone would leave the ranks running."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass


def tool(name: str) -> str:
    """A console script of this interpreter's environment (deepspeed, torchrun, mpirun)."""
    path = BIN / name
    return str(path) if path.exists() else name


def slurm_job_id_with_free_port() -> int:
    """A job id whose derived master port (15000 + id % 20000, as relbert_ds.parallel.distributed derives it
    under SLURM) is free right now: for starting ranks with srun's environment by hand."""
    for job in range(1000, 20000, 37):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + job))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port in 15000-35000")


def rank_env(**extra: str) -> dict[str, str]:
    """Environment for launched ranks: no inherited rank variables, one BLAS thread, offline hub,
    this checkout first on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


def launch_cmd(script: str, args: Sequence[str], nproc: int, launcher: str = "torchrun") -> list[str]:
    """The command that starts ``script`` on ``nproc`` local ranks.

    ``torchrun`` and ``deepspeed`` are the real launchers; ``python`` runs one rank without one.
    """
    if launcher == "python":
        if nproc != 1:
            raise ValueError("the python launcher runs exactly one rank")
        return [sys.executable, script, *args]
    if launcher == "deepspeed":
        return [tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    if launcher == "torchrun":
        return [tool("torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), script, *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def run(cmd: Sequence[str], timeout: float = 3600, env: Optional[dict] = None, echo: bool = False,
        log_path: Optional[Path] = None, check: bool = True,
        cwd: Optional[Path | str] = None) -> subprocess.CompletedProcess:
    """Run a launcher in its own session; on timeout kill it and every rank under it (``kill_group``)
    and raise; with ``check``, raise on a non-zero exit too (the tests check exits themselves).

    ``log_path`` receives stdout and stderr (the process's own progress bars included).
    """
    if echo:
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or rank_env(), cwd=str(cwd or REPO), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout} s\nstdout:\n{out[-3000:]}\n"
                           f"stderr:\n{err[-5000:]}")
    except BaseException:  # Ctrl-C: no rank outlives the caller
        kill_group(proc)
        raise
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}\nstdout:\n{out[-3000:]}\n"
                           f"stderr:\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_logged(cmd: Sequence[str], log_path: Path, timeout: float, env: Optional[dict] = None) -> Optional[int]:
    """Run ``cmd`` in its own session with stdout and stderr in ``log_path`` (a file, not pipes: a rank
    that outlives a kill cannot block the caller on a pipe); return its exit code, or None when it ran
    past ``timeout`` and it and every process under it were killed (:func:`kill_group`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or rank_env(), cwd=str(REPO), start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
            return None
        except BaseException:  # SIGTERM or Ctrl-C of the caller: no rank outlives it
            kill_group(proc)
            proc.wait()
            raise


def setup_single_process(threads: Optional[int] = None) -> Any:
    """Join a one-rank process group (what the trainer does with plain ``python``) and set threads.

    Returns relbert_ds's DistInfo. Quiet logs, as the command lines do.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from relbert_ds.cli.common import setup_logging
    from relbert_ds.parallel import distributed

    setup_logging(False)
    import logging

    logging.getLogger("relbert_ds").setLevel(logging.WARNING)
    info = distributed.init_distributed()
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return info
