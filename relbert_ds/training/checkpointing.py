"""Checkpoints of a training run: DeepSpeed's engine state plus what relbert-ds needs to
continue exactly (sampler position, per-rank RNG states, best-so-far, history).

Layout (names in :mod:`relbert_ds.training.run_directory`): ``<run>/checkpoints/global_step<N>/``
(DeepSpeed's files + ``rng_state_rank<r>.pt`` + ``relbert_ds_checkpoint.json``, written last as
the completeness marker, with the size of every file as the rank that wrote it saw it: on a network
file system rank 0 may see another node's file at a stale size) and ``<run>/checkpoints/latest`` (the tag,
replaced atomically only after every rank has finished writing). A kill at any point therefore
leaves ``latest`` naming a complete checkpoint.

A write that fails (a full disk, a quota, an I/O error) on any rank does not stop that rank in the
middle of DeepSpeed's collective save: the failure is recorded, the save runs to its end on every
rank, the ranks exchange what failed, rank 0 removes the partial folder, and every rank raises the
same one-line error (``latest`` keeps naming the previous checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from relbert_ds.errors import CheckpointError, DiskFullError
from relbert_ds.parallel import collectives, distributed
from relbert_ds.training.config import write_json
from relbert_ds.training.run_directory import (
    CHECKPOINTS,
    LATEST,
    MARKER,
    RunDirectory,
    describe_bytes,
    folder_size,
    read_latest,
    says_disk_full,
    step_of,
    tag_for,
)

# What a failed file write raises: OSError, or torch.save's RuntimeError (its text varies with the
# format and says nothing useful: "write(): fd 3 failed with No space left on device", "unexpected
# pos 576 vs 534", "basic_ios::clear: iostream error").
WRITE_ERRORS = (OSError, RuntimeError)


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class _WriteFailure:
    """One rank's failed write: where, why, and whether the file system was full."""
    rank: int
    path: str
    error: str
    disk_full: bool


def estimate_checkpoint_bytes(engine: Any, run: RunDirectory) -> int:
    """About how many bytes the next checkpoint takes: the newest complete one's size, else the
    engine's state (module states in their dtype + fp32 master weights and two Adam moments)."""
    previous = latest_complete(run.path)
    if previous is not None:
        return folder_size(previous)
    params = list(engine.module.parameters()) if hasattr(engine, "module") else []
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    module_bytes = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params)
    return module_bytes + 12 * numel


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _no_room_message(tag_dir: Path, needed: int, free: int, keep_last: int, when: str) -> str:
    latest = read_latest(tag_dir.parent)
    kept = f"{LATEST} still names {latest}" if latest else f"no {LATEST} was written"
    less = (f"; --keep_last 1 needs less: one checkpoint kept instead of {keep_last}" if keep_last > 1 else "")
    return (f"no room for checkpoint {tag_dir} {when}: it needs about {describe_bytes(needed)}, "
            f"{describe_bytes(free)} free; {kept}; fix: free space on that file system or point --output_dir "
            f"elsewhere{less}")


def check_free_space(tag_dir: Path, needed: int, keep_last: int) -> None:
    """Refuse to start writing a checkpoint that cannot fit (raises :class:`DiskFullError`)."""
    free = _free_bytes(tag_dir.parent)
    if tag_dir.is_dir():  # re-saving a step: its old files are replaced
        free += folder_size(tag_dir)
    if free < needed:
        raise DiskFullError(_no_room_message(tag_dir, needed, free, keep_last, "(nothing was written)"))


@contextlib.contextmanager
def _recording_engine_writes(engine: Any, failures: list[_WriteFailure], needed: int,
                             written: dict[str, int]) -> Iterator[None]:
    """While DeepSpeed saves, a failed file write is recorded instead of raised, so that the rank
    goes on through the rest of DeepSpeed's collective save (a rank that left it would leave its
    peers waiting in its final barrier); a file written is recorded in ``written`` (path: size)."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None or not hasattr(checkpoint_engine, "save"):
        yield
        return
    real_save = checkpoint_engine.save

    def save(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = real_save(state_dict, path, *args, **kwargs)
            written[str(path)] = Path(path).stat().st_size
            return result
        except WRITE_ERRORS as exc:
            failures.append(_failure(Path(path), exc, needed))
            return None

    checkpoint_engine.save = save
    try:
        yield
    finally:
        checkpoint_engine.save = real_save


def _failure(path: Path, exc: BaseException, needed: int) -> _WriteFailure:
    free = _free_bytes(path.parent)
    # torch.save words a full disk in several ways (or not at all): little room left says it too.
    full = says_disk_full(exc) or free < max(needed // 10, 1 << 20)
    return _WriteFailure(distributed.rank(), str(path), f"{type(exc).__name__}: {exc}", full)


def _gather_writes(own: list[_WriteFailure], written: dict[str, int],
                   tag_dir: Path) -> tuple[list[_WriteFailure], list[dict[str, int]]]:
    """Every rank's failed writes, and the size of every file of ``tag_dir`` each rank wrote (name:
    size, per rank in rank order), on every rank (one exchange: also the barrier after the save)."""
    mine = {Path(path).name: size for path, size in written.items() if Path(path).parent == tag_dir}
    gathered = collectives.all_gather_object(([vars(f) for f in own], mine))
    return [_WriteFailure(**f) for failed, _ in gathered for f in failed], [sizes for _, sizes in gathered]


def marker_files(tag_dir: Path, reported: list[dict[str, int]]) -> dict[str, int]:
    """The ``files`` of the completeness marker: every file at the size the rank that wrote it
    reported (``reported``: name -> size, one mapping per rank). A reported file is never looked up
    here: on NFS rank 0 may see another node's file at a stale size, and a good checkpoint would
    later be refused as truncated. Files of ``tag_dir`` no rank reported (written outside the
    checkpoint engine: DeepSpeed 0.19.8 writes none there, an engine without one writes them all)
    are looked up by rank 0, as before."""
    files = {name: size for sizes in reported for name, size in sizes.items()}
    for path in tag_dir.iterdir():
        if path.name not in files and path.name != MARKER and path.is_file():
            files[path.name] = path.stat().st_size
    return dict(sorted(files.items()))


def save_checkpoint(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Every rank calls this (DeepSpeed's save is collective; rank-0-only saving deadlocks).

    Raises :class:`DiskFullError` on every rank when the checkpoint does not fit (checked before
    writing from the previous checkpoint's size, and on a failed write), and
    :class:`CheckpointError` for any other failed write; either way the partial folder is gone
    and ``latest`` is unchanged.
    """
    run = RunDirectory(run_dir)
    root = run.checkpoints
    tag = tag_for(step)
    tag_dir = root / tag
    needed = estimate_checkpoint_bytes(engine, run)
    distributed.agree(lambda: check_free_space(tag_dir, needed, keep_last))
    failures: list[_WriteFailure] = []
    written: dict[str, int] = {}  # path -> size of each file this rank wrote

    def attempt(path: Path, write: Any) -> None:
        try:
            write()
        except WRITE_ERRORS as exc:
            failures.append(_failure(path, exc, needed))

    attempt(tag_dir, lambda: tag_dir.mkdir(parents=True, exist_ok=True))
    marker = tag_dir / MARKER
    if distributed.is_main() and marker.exists():
        marker.unlink()  # re-saving the same step: it is incomplete until we finish again
    distributed.barrier()
    rng_file = tag_dir / f"rng_state_rank{distributed.rank()}.pt"

    def save_rng() -> None:
        torch.save(rng_state(), rng_file)
        written[str(rng_file)] = rng_file.stat().st_size

    attempt(rng_file, save_rng)
    with _recording_engine_writes(engine, failures, needed, written):
        try:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        except WRITE_ERRORS as exc:
            # Not a write through the checkpoint engine: in DeepSpeed 0.19.8 that is rank 0 copying
            # zero_to_fp32.py, after every collective of the save but its closing barrier, which
            # this barrier stands in for.
            failures.append(_failure(root, exc, needed))
            distributed.barrier()
    # every rank's shards are on disk, or we know who failed
    failures, reported = _gather_writes(failures, written, tag_dir)

    def finish() -> None:
        if failures:
            raise _discard(tag_dir, failures, needed, keep_last)
        try:
            files = marker_files(tag_dir, reported)
            write_json(marker, {**meta, "step": step, "tag": tag, "world_size": distributed.world_size(),
                                "files": files})
            run.write_latest(tag)
        except OSError as exc:
            raise _discard(tag_dir, [_failure(marker, exc, needed)], needed, keep_last) from exc
        prune(root, keep_last)

    distributed.agree(finish, main_only=True)
    return tag_dir


def _discard(tag_dir: Path, failures: list[_WriteFailure], needed: int, keep_last: int) -> CheckpointError:
    """Remove the partial checkpoint (rank 0) and word the error every rank raises."""
    shutil.rmtree(tag_dir, ignore_errors=True)
    first = failures[0]
    who = f"rank {first.rank} " if distributed.world_size() > 1 else ""
    where = f" ({who}writing {Path(first.path).name}: {first.error})"
    full = [f for f in failures if f.disk_full]
    if full:
        free = _free_bytes(tag_dir.parent)
        return DiskFullError(_no_room_message(tag_dir, needed, free, keep_last,
                                              "(the disk filled up while it was written; the partial folder was "
                                              "removed)"))
    latest = read_latest(tag_dir.parent)
    return CheckpointError(f"could not write checkpoint {tag_dir}{where}; the partial folder was removed and "
                           f"{LATEST} still names {latest or 'no checkpoint'}; fix: check that the file system of "
                           f"--output_dir is writable and healthy, then --resume latest")


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    run = RunDirectory(root.parent)
    latest = run.read_latest()
    tags = run.tag_dirs()
    complete = [d for d in tags if (d / MARKER).exists()]
    for old in complete[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    # Incomplete folders older than the newest complete one are leftovers of a kill.
    newest = step_of(complete[-1]) if complete else -1
    for d in tags:
        if not (d / MARKER).exists() and step_of(d) < newest and d.name != latest:
            shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint folder ``--resume`` names ('latest' or a path); it must be complete, with
    every file at the size it was written with."""
    if resume == "latest":
        run = RunDirectory(run_dir)
        tag_dir = run.latest_tag_dir()
        if tag_dir is None:
            raise CheckpointError(f"--resume latest: {run_dir} has no checkpoint ({run.latest_file} is missing); fix: "
                                  f"check --output_dir, or start without --resume")
    else:
        tag_dir, _ = _pointed_tag(Path(resume))
    if not (tag_dir / MARKER).exists():
        raise CheckpointError(f"{tag_dir} is not a complete relbert-ds checkpoint (no {MARKER}); fix: pass "
                              f"--resume latest or a checkpoints/global_step<N> folder that finished writing")
    check_files(tag_dir)
    return tag_dir


def check_files(tag_dir: Path) -> None:
    """Every file the marker lists is there at the size it was written with (a truncated copy,
    an interrupted sync); checkpoints written before the marker listed files are not checked."""
    meta = read_meta(tag_dir)
    for name, size in (meta.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (the checkpoint was written with it); fix: "
                                  f"restore it, or resume from another checkpoint of {tag_dir.parent}")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {path} is {actual} bytes, it was written with {size} (truncated "
                                  f"or damaged); fix: restore it, or resume from another checkpoint of "
                                  f"{tag_dir.parent}")


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / MARKER).read_text())


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], tag_dir: Path) -> None:
    """Refuse to resume where the checkpoint cannot continue this run (before DeepSpeed loads it). Another
    world size is not a reason: the batch plan does not depend on it, and ZeRO shards are converted
    (:func:`convert_to_universal`)."""
    for key, option in (("model", "model"), ("hidden_size", "model"), ("num_parameters", "model"),
                        ("template", "template"), ("pooling", "pooling"), ("loss", "loss")):
        if key in meta and key in expected and meta[key] != expected[key]:
            raise CheckpointError(
                f"checkpoint {tag_dir} is of another run: its {key} is {meta[key]!r}, this run's is "
                f"{expected[key]!r}; fix: resume with --{option} {meta.get(option)!r}, or start a new --output_dir")


UNIVERSAL_SUFFIX = ".universal"
UNIVERSAL_DONE = "relbert_ds_universal.json"


def universal_dir(tag_dir: Path) -> Path:
    """Where :func:`convert_to_universal` puts the universal form of ``tag_dir``: beside it, named so that
    :func:`prune` removes it (an incomplete ``global_step*`` folder) once a newer checkpoint is complete."""
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def convert_to_universal(tag_dir: Path, world_size: int) -> Path:
    """Rank 0: DeepSpeed's universal checkpoint of ``tag_dir``, for a resume at another world size.

    ZeRO 1-3 split the fp32 master weights and Adam moments by the world size; DeepSpeed's
    ``ds_to_universal`` rewrites them per parameter, which any world size loads
    (``"checkpoint": {"load_universal": true}``). Done once per checkpoint (reused when complete),
    into a temporary folder renamed into place, so an interrupted conversion is never loaded.
    """
    import subprocess
    import sys

    out = universal_dir(tag_dir)
    if (out / UNIVERSAL_DONE).is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(tag_dir), "--output_folder", str(tmp), "--num_extract_workers", "1",
                             "--num_merge_workers", "1", "--inject_missing_state"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"checkpoint {tag_dir} could not be converted for a resume at {world_size} ranks "
                              f"(DeepSpeed's ds_to_universal: {last}); fix: resume with the world size it was "
                              f"written with ({read_meta(tag_dir).get('world_size')} ranks)")
    write_json(tmp / UNIVERSAL_DONE, {"source": tag_dir.name, "for_world_size": world_size})
    os.replace(tmp, out)
    return out


def load_checkpoint(engine: Any, tag_dir: Path, load_dir: Optional[Path] = None) -> dict[str, Any]:
    """Load engine, optimizer, scheduler and this rank's RNG states; return the client state.

    ``load_dir``: the folder DeepSpeed loads (the universal form of ``tag_dir`` at another world
    size); the RNG state comes from ``tag_dir``, where a rank that did not exist there keeps its own.
    """
    load_dir = load_dir or tag_dir
    path, client_state = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}; fix: resume from another checkpoint")
    rng_file = tag_dir / f"rng_state_rank{distributed.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}


def latest_complete(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, if it is complete (None otherwise)."""
    tag_dir = RunDirectory(run_dir).latest_tag_dir()
    return tag_dir if tag_dir is not None and (tag_dir / MARKER).exists() else None


def _pointed_tag(path: Path) -> tuple[Path, Optional[Path]]:
    """The tag folder that a run folder or its ``checkpoints`` folder names in ``latest`` (a tag
    folder names itself), and that ``latest`` file (None where none was followed)."""
    if (path / MARKER).exists():
        return path, None
    for folder in (path / CHECKPOINTS, path):
        tag = read_latest(folder)
        if tag is not None:
            return folder / tag, folder / LATEST
    return path, None


def resolve_tag_dir(path: Path) -> Path:
    """A run folder, its ``checkpoints`` folder (their latest) or a ``global_step<N>`` folder ->
    the tag folder, which must be complete."""
    tag_dir, pointer = _pointed_tag(path)
    if (tag_dir / MARKER).exists():
        check_files(tag_dir)
        return tag_dir
    if pointer is not None:
        raise CheckpointError(f"{tag_dir} (named by {pointer}) is not a complete relbert-ds checkpoint "
                              f"(no {MARKER}); fix: pass a checkpoints/global_step<N> folder that finished writing")
    raise CheckpointError(f"{path} is not a complete relbert-ds checkpoint (no {MARKER}, no {LATEST} pointer); fix: "
                          f"pass a run's checkpoints folder or one of its global_step<N> folders that finished writing")


def consolidated_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The trained module's weights from a checkpoint of any ZeRO stage, in one CPU process.

    ZeRO 1-3 keep fp32 master weights in the optimizer shards: DeepSpeed's zero_to_fp32 rebuilds
    them (it reads its own pickles with weights_only=False). Without ZeRO the module state in
    ``mp_rank_00_model_states.pt`` is read with weights_only=True; after 16-bit training the fp32
    masters are taken from the optimizer state saved beside it.
    """
    # bf16 runs name their optimizer shards bf16_zero_pp_rank_*: their module states hold bf16 copies
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")) or any(tag_dir.glob("*zero_pp_rank_*model_states.pt")):
        import io

        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-shard progress
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states; fix: point at a complete checkpoint")
    return _with_fp32_masters(torch.load(states, map_location="cpu", weights_only=True))


def _with_fp32_masters(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The module state of a ZeRO-0 checkpoint, trainable parameters replaced by their fp32 masters.

    After bf16/fp16 training without ZeRO, ``module`` holds the 16-bit copies; DeepSpeed's FP16
    optimizer wrappers save the fp32 masters as ``optimizer.fp32_groups``, parameter for parameter
    in the module's order of trainable parameters (what relbert-ds hands to deepspeed.initialize).
    The shapes are checked one by one: a checkpoint that does not line up keeps its module state.
    """
    module, optimizer = saved["module"], saved.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups:
        return module
    masters = [t for group in groups for t in group]
    buffers = set(saved.get("buffer_names") or ())
    frozen = set((saved.get("frozen_param_shapes") or {}).keys())
    names = [k for k, v in module.items() if k not in buffers and k not in frozen and v.is_floating_point()]
    if len(names) != len(masters) or any(module[n].shape != m.shape for n, m in zip(names, masters)):
        return module
    return {**module, **{n: m for n, m in zip(names, masters)}}


def check_prompt(meta: dict[str, Any], tag_dir: Path, template: Optional[str] = None,
                 pooling: Optional[str] = None) -> None:
    """Refuse a template/pooling other than the one the checkpoint was trained with."""
    from relbert_ds.model.prompts import resolve_template

    if template is not None and resolve_template(template) != meta["template"]:
        raise CheckpointError(f"checkpoint {tag_dir} was trained with template {meta['template']!r}, not "
                              f"{resolve_template(template)!r}; fix: drop --template (the checkpoint's is used)")
    if pooling is not None and pooling != meta["pooling"]:
        raise CheckpointError(f"checkpoint {tag_dir} was trained with pooling {meta['pooling']!r}, not {pooling!r}; "
                              f"fix: drop --pooling (the checkpoint's is used)")


def encoder_from_checkpoint(path: Path, template: Optional[str] = None, pooling: Optional[str] = None) -> Any:
    """A RelationEncoder with the weights of a trainer checkpoint (any ZeRO stage).

    The backbone named in the checkpoint must be loadable (its architecture and tokenizer).
    ``template``/``pooling``, when given, must match what the checkpoint was trained with.
    """
    from relbert_ds.model.encoder import RelationEncoder

    tag_dir = resolve_tag_dir(Path(path))
    meta = read_meta(tag_dir)
    check_prompt(meta, tag_dir, template, pooling)
    encoder = RelationEncoder.from_pretrained(meta["model"], template=meta["template"], pooling=meta["pooling"],
                                              max_length=meta.get("max_length"),
                                              warn_untrained=False)  # its trained weights are loaded below
    prefix = "encoder.backbone."
    state = {k[len(prefix):]: v for k, v in consolidated_weights(tag_dir).items() if k.startswith(prefix)}
    missing, unexpected = encoder.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(encoder.backbone.named_parameters())]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {tag_dir} does not fit {meta['model']} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected weights); fix: evaluate it with the backbone it was "
                              f"trained from")
    encoder.name = str(path)
    return encoder
