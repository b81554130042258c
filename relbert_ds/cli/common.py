"""The one shell every command line runs in: parse (a bad option is one line from rank 0),
logging, then the body, where a user error becomes ``error: <message>`` printed once and exit
status 2, and a failure agreed across ranks (:func:`relbert_ds.parallel.distributed.agree`) is printed
once with its traceback and exit status 1."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence, TypeVar

from relbert_ds.errors import UserError

A = TypeVar("A")


def setup_logging(verbose: bool = False) -> None:
    """INFO from relbert-ds on rank 0, warnings elsewhere; third-party chatter off unless verbose."""
    from relbert_ds.parallel.distributed import env_rank

    rank = env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _one_line_warnings(rank)
    if not verbose:
        import warnings

        # torch.distributed's deprecation notices come from DeepSpeed's calls, once per rank.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        if "DS_ACCELERATOR" not in os.environ:
            import torch

            if not torch.cuda.is_available():
                os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed warns on every rank that it fell back
        for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass


def _one_line_warnings(rank: int) -> None:
    """relbert-ds's own warnings as ``warning: <message>``, printed by rank 0 only.

    Python's format (``/path/cli/evaluate.py:154: UntrainedModelWarning: ...``) points at our source,
    not at what the user should do; the message already says that. The ranks read the same inputs, so
    the other ranks' copies would only repeat it. Other libraries' warnings keep Python's format.
    """
    import warnings

    default = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if f"{os.sep}relbert_ds{os.sep}" not in filename:
            default(message, category, filename, lineno, file, line)
        elif rank == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def run_command(argv: Optional[Sequence[str]], parse: Callable[[Optional[Sequence[str]]], A],
                body: Callable[[A], int], verbose: Callable[[A], bool] = lambda a: False) -> int:
    """Parse ``argv`` and run ``body(args)``; returns the exit status.

    A bad option (a :class:`UserError` from ``parse``) is printed by rank 0 only and returns 2 on
    every rank (see :func:`_report_bad_option`).
    """
    try:
        args = parse(argv)
    except UserError as exc:
        _report_bad_option(exc)
        return exc.exit_code
    setup_logging(verbose(args))
    return run_main(lambda: body(args))


def _report_bad_option(exc: UserError) -> None:
    """Print a command-line error once, on rank 0, before any rank exits.

    The ranks join the job just long enough for rank 0 to print and a barrier: a launcher that
    ends the job at the first non-zero exit (srun --kill-on-bad-exit, torchrun) would otherwise
    kill rank 0 before it printed when another rank exited first. Where the job cannot be
    joined, the rank the launcher's environment names 0 prints.
    """
    from relbert_ds.parallel import distributed

    try:
        distributed.init_distributed(connect_timeout_s=60)
    except Exception:  # noqa: BLE001 - the option error is the message; the rendezvous is a bonus
        if distributed.env_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    try:
        if distributed.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        _barrier_quietly()
    finally:
        distributed.shutdown()


def _barrier_quietly() -> None:
    """Wait for every rank (after rank 0 printed), ignoring a broken job: it only orders exits."""
    from relbert_ds.parallel import distributed

    try:
        distributed.barrier()
    except Exception:  # noqa: BLE001 - a peer already gone: nothing to order
        pass


def run_main(body: Callable[[], int]) -> int:
    """Run ``body``; a UserError becomes ``error: <message>`` on one rank and exit status 2; a
    failure agreed across ranks is printed once by rank 0 and exit status 1. After an agreed
    failure every rank waits for rank 0 to have printed before it exits (see
    :func:`_report_bad_option` for why)."""
    from relbert_ds.parallel import distributed

    try:
        return body()
    except UserError as exc:
        rank = distributed.rank()
        if getattr(exc, "agreed", False):
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            _barrier_quietly()
        else:
            prefix = f"[rank {rank}] " if distributed.world_size() > 1 else ""
            print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except distributed.AgreedError as exc:
        if distributed.rank() == 0:
            print(f"{exc.report.rstrip()}\nerror: internal error ({exc}); every rank stopped. This is a bug in "
                  f"relbert-ds or a library it uses: please report it with the traceback above",
                  file=sys.stderr, flush=True)
        _barrier_quietly()
        return 1
    finally:
        distributed.shutdown()


def exit_process(code: int) -> None:
    """Leave the process with ``code`` once everything is written, skipping interpreter teardown.

    Why: after a distributed run, destroying the C++ state of torch.distributed and the loaded
    libraries at interpreter exit sometimes aborts ("terminate called without an active
    exception", measured on about 1 exit in 8 of 2-rank CPU jobs), turning a clean exit status
    into SIGABRT on a random rank. Every file the library writes is closed before ``main``
    returns, so only the standard streams and logging need flushing here.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # else mpirun reports the rank as having exited improperly
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
