"""The layout of a training run's folder (``--output_dir``), in one place.

::

    <run>/config.json            the run's options and what they resolved to (rank 0, at start)
    <run>/ds_config.json         the DeepSpeed config with every "auto" filled in
    <run>/history.jsonl          one JSON record per optimizer step, validation or epoch
    <run>/checkpoints/latest     the tag of the newest complete checkpoint (replaced atomically)
    <run>/checkpoints/global_step<N>/   DeepSpeed's files, RNG states, the completeness marker
    <run>/best_model/  <run>/model/     exported Hugging Face folders (best validated, last)
    <run>/tensorboard/           TensorBoard events
    <run>/results.json           the command line's summary of the finished run

The trainer, the checkpoint code and the evaluator (which refuses a whole run folder and accepts
its ``checkpoints`` folder) all read these names from here.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

from relbert_ds.errors import ConfigError, DiskFullError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "relbert_ds_checkpoint.json"  # written last into a checkpoint folder: it is complete
TAG_PREFIX = "global_step"
HISTORY = "history.jsonl"
CONFIG = "config.json"
DS_CONFIG = "ds_config.json"
BEST_MODEL = "best_model"
MODEL = "model"
TENSORBOARD = "tensorboard"
RESULTS = "results.json"

# Any of these in a folder means a run was started there (refused without --resume/--overwrite).
RUN_MARKERS = (CONFIG, CHECKPOINTS, MODEL)
# What --overwrite removes: everything a run writes, nothing else the user keeps there.
RUN_FILES = (*RUN_MARKERS, BEST_MODEL, TENSORBOARD, HISTORY, DS_CONFIG, RESULTS)


def tag_for(step: int) -> str:
    """The checkpoint tag (folder name) of optimizer step ``step``."""
    return f"{TAG_PREFIX}{step}"


def step_of(tag_dir: Path) -> int:
    """The step a ``global_step<N>`` folder holds (-1 for any other name)."""
    try:
        return int(tag_dir.name.removeprefix(TAG_PREFIX))
    except ValueError:
        return -1


def read_latest(folder: Path) -> Optional[str]:
    """The tag that ``folder/latest`` names (``folder`` is a run's ``checkpoints`` folder), or
    None where there is no such file. The one place that parses ``latest``."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    return pointer.read_text().strip()


def write_latest(folder: Path, tag: str) -> None:
    """Point ``folder/latest`` at ``tag`` atomically (a reader sees the old tag or the new one,
    never a torn file): write ``latest.tmp``, then ``os.replace`` it."""
    tmp = Path(folder) / (LATEST + ".tmp")
    try:
        tmp.write_text(tag)
        os.replace(tmp, Path(folder) / LATEST)
    finally:
        if tmp.exists():  # the write or the replace failed: leave no stray file, keep the old latest
            tmp.unlink()


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (0 where it does not exist)."""
    if not path.is_dir():
        return path.stat().st_size if path.is_file() else 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_bytes(n: float) -> str:
    """``n`` bytes for a message: 512 B, 3.2 MB, 41.0 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class RunDirectory:
    """One run's folder: the path of every file the run writes, ``latest``, the history, and the
    checks made before anything is written there."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest_file(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def ds_config(self) -> Path:
        return self.path / DS_CONFIG

    @property
    def best_model(self) -> Path:
        return self.path / BEST_MODEL

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    def tag_dir(self, step: int) -> Path:
        """The checkpoint folder of optimizer step ``step``."""
        return self.checkpoints / tag_for(step)

    def tag_dirs(self) -> list[Path]:
        """Every ``global_step<N>`` folder (complete or not), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((d for d in self.checkpoints.iterdir() if d.is_dir() and d.name.startswith(TAG_PREFIX)),
                      key=step_of)

    # ------------------------------------------------------------------ latest
    def read_latest(self) -> Optional[str]:
        """The tag ``checkpoints/latest`` names (None without one)."""
        return read_latest(self.checkpoints)

    def write_latest(self, tag: str) -> None:
        write_latest(self.checkpoints, tag)

    def latest_tag_dir(self) -> Optional[Path]:
        """The folder ``latest`` names (complete or not), or None without ``latest``."""
        tag = self.read_latest()
        return None if tag is None else self.checkpoints / tag

    # ------------------------------------------------------------------ history
    def append_history(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line (rank 0 only). An unwritable history raises
        :class:`HistoryError` naming the file."""
        try:
            with open(self.history, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise HistoryError(self.history, exc) from exc

    def history_lines(self) -> list[str]:
        """The non-empty lines of ``history.jsonl`` ([] without one)."""
        if not self.history.exists():
            return []
        try:
            return [line for line in self.history.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise HistoryError(self.history, exc, reading=True) from exc

    def rewrite_history(self, lines: list[str]) -> None:
        """Replace ``history.jsonl`` by ``lines`` (a resume drops the records it is about to redo)."""
        try:
            self.history.write_text("".join(line + "\n" for line in lines))
        except OSError as exc:
            raise HistoryError(self.history, exc) from exc

    def write_json(self, path: Path, data: Any) -> None:
        """Write one of the run's JSON files atomically; a file system that refuses it (full,
        read-only) is one :class:`ConfigError` line naming the file."""
        from relbert_ds.training.config import write_json

        try:
            write_json(path, data)
        except OSError as exc:
            Path(path).with_name(Path(path).name + ".tmp").unlink(missing_ok=True)
            raise ConfigError(f"{path} cannot be written ({_reason(exc)}); fix: free space on that file system "
                              f"or pass another --output_dir") from exc

    def write_folder(self, directory: Path, write: Callable[[Path], None]) -> Path:
        """Write an export folder (``model/``, ``best_model/``) all or nothing: ``write(tmp)``
        fills ``<directory>.tmp``, which then replaces ``directory``. A file system that refuses
        a write (full, read-only, I/O error) is one error line; the partial folder is removed and
        an earlier ``directory`` is kept."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            write(tmp)
        except Exception as exc:  # noqa: BLE001 - torch and safetensors word a failed write in their own types
            free = shutil.disk_usage(self.path).free
            full = says_disk_full(exc) or free < (1 << 20)
            if not isinstance(exc, OSError) and not full:
                raise  # not the file system: a bug, with its traceback
            written = folder_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"; the earlier {directory.name} is kept" if directory.exists() else ""
            if full:
                raise DiskFullError(
                    f"no room to write {directory}: the disk filled up after {describe_bytes(written)} "
                    f"({describe_bytes(shutil.disk_usage(self.path).free)} free now the partial folder is "
                    f"removed{kept}); fix: free space on that file system or point --output_dir elsewhere, then "
                    f"--resume latest (it writes {directory.name} again)") from exc
            raise ConfigError(f"could not write {directory} ({_reason(exc)}; the partial folder was removed{kept}); "
                              f"fix: make --output_dir writable, then --resume latest") from exc
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        return directory

    # ------------------------------------------------------------------ what is there
    def existing_run_files(self) -> list[str]:
        """The names of :data:`RUN_MARKERS` present: non-empty means a run was started here."""
        return [name for name in RUN_MARKERS if (self.path / name).exists()]

    def clear(self) -> None:
        """Remove everything a run writes (``--overwrite``); other files stay."""
        for name in RUN_FILES:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def is_run_directory(self) -> bool:
        """A trainer's output folder: a ``checkpoints`` folder next to the run's history or its
        DeepSpeed config (the evaluator refuses it: it holds several models)."""
        return self.path.is_dir() and self.checkpoints.is_dir() and (
            self.history.is_file() or self.ds_config.is_file())

    def looks_like_checkpoint(self) -> bool:
        """This folder, or its ``checkpoints`` folder, holds trainer checkpoints: a ``latest``
        pointer, ``global_step<N>`` folders, or (a tag folder itself) DeepSpeed model states."""
        if not self.path.is_dir():
            return False
        for folder in (self.path, self.checkpoints):
            if (folder / LATEST).is_file() or any(folder.glob(TAG_PREFIX + "*")) or \
                    any(folder.glob("*model_states.pt")):
                return True
        return False

    # ------------------------------------------------------------------ before writing
    def check_writable(self, create: bool = True) -> None:
        """Create the folder (with ``create``) and prove that a file can be written in it, so that
        a bad ``--output_dir`` fails in one line before any work instead of with a traceback at
        the first write. Raises :class:`ConfigError`."""
        fix = "fix: pass an --output_dir on a writable file system (a folder you can create files in)"
        path = self.path
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError(f"--output_dir {path} cannot be created: {blocker} is a file, not a folder; {fix}")
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--output_dir {path} cannot be created ({_reason(exc)}); {fix}") from exc
        elif not path.is_dir():
            return
        probe = path / f".relbert_ds_write_test.{os.getpid()}"
        try:
            probe.write_text("")
        except OSError as exc:
            raise ConfigError(f"--output_dir {path} is not writable ({_reason(exc)}); {fix}") from exc
        finally:
            try:
                probe.unlink()
            except OSError:
                pass


def _reason(exc: OSError) -> str:
    """An OSError as a short reason: 'read-only file system', 'permission denied', ..."""
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)


class HistoryError(ConfigError):
    """``history.jsonl`` could not be written or read."""

    def __init__(self, path: Path, exc: OSError, reading: bool = False, stopped: str = "") -> None:
        self.path, self.exc, self.reading = path, exc, reading
        what = "read" if reading else "written"
        reason = "it is a folder" if isinstance(exc, IsADirectoryError) or path.is_dir() else _reason(exc)
        super().__init__(stopped or f"{path} cannot be {what} ({reason}); fix: make it a writable file again (or "
                                    f"move the run to a writable --output_dir)")
        self.reason = reason

    def stopped(self, step: int, checkpoint: Optional[Path]) -> "HistoryError":
        """This error as the reason a run stopped after optimizer step ``step``, saying what is
        lost given the newest complete ``checkpoint``."""
        done = step_of(checkpoint) if checkpoint is not None else 0
        since = f"checkpoint {checkpoint.name}" if checkpoint is not None else "the start (there is no checkpoint)"
        return HistoryError(self.path, self.exc, self.reading, stopped=(
            f"{self.path} cannot be written ({self.reason}) after optimizer step {step}: training stopped on every "
            f"rank; lost: the training since {since} (steps {done + 1}-{step}, whose records are not all in the "
            f"history); fix: make it a writable file again, then --resume latest re-runs those steps"))


def says_disk_full(exc: BaseException) -> bool:
    """The exception itself says the disk (or the quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left" in str(exc) or "Disk quota exceeded" in str(exc)


VALIDATION_KINDS = ("epoch", "eval")  # validation records at the epoch cadence, or every N steps


def read_history(run_dir: Union[str, Path]) -> tuple[list[dict], list[dict]]:
    """(step records, validation records) of a run's ``history.jsonl``, each sorted by optimizer step: the
    one reader of the file (figures, benchmarks, tests).

    ``run_dir`` is a run directory or its ``history.jsonl``. A resumed run may repeat a step (the trainer
    truncates history on resume; an older file may not be): the last record wins. A missing file or a
    line that is not a record is a :class:`ConfigError` naming it.
    """
    path = Path(run_dir).expanduser()
    fix = f"fix: pass a relbert-ds run directory (the --output_dir of a training run, which holds {HISTORY})"
    if not path.exists():
        raise ConfigError(f"{path} does not exist; {fix}")
    if path.is_dir():
        if not (path / HISTORY).is_file():
            raise ConfigError(f"{path} has no {HISTORY}, so it is not a relbert-ds run directory; {fix}")
        path = path / HISTORY
    steps: dict[int, dict] = {}
    evals: dict[tuple, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind, step = record.get("kind"), int(record["optimizer_step"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}:{number} is not a history record ({exc.__class__.__name__}); fix: pass the "
                              f"{HISTORY} the trainer wrote") from exc
        if kind == "step":
            steps[step] = record
        elif kind in VALIDATION_KINDS:
            evals[(step, record.get("epoch"))] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals, key=lambda k: (k[0], k[1] or 0))]
