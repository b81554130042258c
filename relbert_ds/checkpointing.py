"""Checkpoints of a training run: DeepSpeed's engine state plus what relbert-ds needs to
continue exactly (sampler position, per-rank RNG states, best-so-far, history).

Layout: ``<run>/checkpoints/global_step<N>/`` (DeepSpeed's files + ``rng_state_rank<r>.pt`` +
``relbert_ds_checkpoint.json``, written last as the completeness marker) and
``<run>/checkpoints/latest`` (the tag, replaced atomically only after every rank has finished
writing). A kill at any point therefore leaves ``latest`` naming a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from relbert_ds import distributed
from relbert_ds.config import write_json
from relbert_ds.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "relbert_ds_checkpoint.json"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _step_of(tag_dir: Path) -> int:
    try:
        return int(tag_dir.name.removeprefix("global_step"))
    except ValueError:
        return -1


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


def save_checkpoint(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Every rank calls this (DeepSpeed's save is collective; rank-0-only saving deadlocks)."""
    root = run_dir / CHECKPOINTS
    tag = tag_for(step)
    tag_dir = root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    marker = tag_dir / MARKER
    if distributed.is_main() and marker.exists():
        marker.unlink()  # re-saving the same step: it is incomplete until we finish again
    distributed.barrier()
    torch.save(rng_state(), tag_dir / f"rng_state_rank{distributed.rank()}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    distributed.barrier()  # every rank's shards are on disk
    if distributed.is_main():
        write_json(marker, {**meta, "step": step, "tag": tag, "world_size": distributed.world_size()})
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
        prune(root, keep_last)
    distributed.barrier()
    return tag_dir


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    tags = sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("global_step")), key=_step_of)
    complete = [d for d in tags if (d / MARKER).exists()]
    for old in complete[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    # Incomplete folders older than the newest complete one are leftovers of a kill.
    newest = _step_of(complete[-1]) if complete else -1
    for d in tags:
        if not (d / MARKER).exists() and _step_of(d) < newest and d.name != latest:
            shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint folder ``--resume`` names ('latest' or a path); it must be complete."""
    if resume == "latest":
        pointer = run_dir / CHECKPOINTS / LATEST
        if not pointer.exists():
            raise CheckpointError(f"--resume latest: {run_dir} has no checkpoint ({pointer} is missing); fix: check "
                                  f"--output_dir, or start without --resume")
        tag_dir = run_dir / CHECKPOINTS / pointer.read_text().strip()
    else:
        tag_dir, _ = _pointed_tag(Path(resume))
    if not (tag_dir / MARKER).exists():
        raise CheckpointError(f"{tag_dir} is not a complete relbert-ds checkpoint (no {MARKER}); fix: pass "
                              f"--resume latest or a checkpoints/global_step<N> folder that finished writing")
    return tag_dir


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / MARKER).read_text())


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], tag_dir: Path) -> None:
    """Refuse to resume where the checkpoint cannot continue this run (before DeepSpeed loads it)."""
    if meta.get("world_size") != expected["world_size"]:
        raise CheckpointError(
            f"checkpoint {tag_dir} was written by {meta.get('world_size')} ranks and this run has "
            f"{expected['world_size']}; fix: resume with {meta.get('world_size')} ranks (ZeRO shards and the batch "
            f"plan depend on the world size)")
    for key, option in (("model", "model"), ("hidden_size", "model"), ("num_parameters", "model"),
                        ("template", "template"), ("pooling", "pooling"), ("loss", "loss")):
        if key in meta and key in expected and meta[key] != expected[key]:
            raise CheckpointError(
                f"checkpoint {tag_dir} is of another run: its {key} is {meta[key]!r}, this run's is "
                f"{expected[key]!r}; fix: resume with --{option} {meta.get(option)!r}, or start a new --output_dir")


def load_checkpoint(engine: Any, tag_dir: Path) -> dict[str, Any]:
    """Load engine, optimizer, scheduler and this rank's RNG states; return the client state."""
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}; fix: resume from another checkpoint")
    rng_file = tag_dir / f"rng_state_rank{distributed.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}


def latest_complete(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, if it is complete (None otherwise)."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    tag_dir = run_dir / CHECKPOINTS / pointer.read_text().strip()
    return tag_dir if (tag_dir / MARKER).exists() else None


def _pointed_tag(path: Path) -> tuple[Path, Optional[Path]]:
    """The tag folder that a run folder or its ``checkpoints`` folder names in ``latest`` (a tag
    folder names itself), and that ``latest`` file (None where none was followed)."""
    if (path / MARKER).exists():
        return path, None
    for folder in (path / CHECKPOINTS, path):
        if (folder / LATEST).exists():
            return folder / (folder / LATEST).read_text().strip(), folder / LATEST
    return path, None


def resolve_tag_dir(path: Path) -> Path:
    """A run folder, its ``checkpoints`` folder (their latest) or a ``global_step<N>`` folder ->
    the tag folder, which must be complete."""
    tag_dir, pointer = _pointed_tag(path)
    if (tag_dir / MARKER).exists():
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
    ``mp_rank_00_model_states.pt`` is read with weights_only=True.
    """
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")) or any(tag_dir.glob("*zero_pp_rank_*model_states.pt")):
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-shard progress
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states; fix: point at a complete checkpoint")
    return torch.load(states, map_location="cpu", weights_only=True)["module"]


def check_prompt(meta: dict[str, Any], tag_dir: Path, template: Optional[str] = None,
                 pooling: Optional[str] = None) -> None:
    """Refuse a template/pooling other than the one the checkpoint was trained with."""
    from relbert_ds.prompts import resolve_template

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
    from relbert_ds.encoder import RelationEncoder

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
