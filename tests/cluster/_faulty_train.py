"""launchers/train.py with a SIGKILL planted inside checkpoint writing (the fault tests).

RELBERT_DS_TEST_KILL=<point>:<n> kills this process (SIGKILL, no clean-up of any kind) at the
n-th time it reaches <point> during this run:

- ``rng``     just before writing this rank's ``rng_state_rank<r>.pt`` (the first file of a save);
- ``engine``  inside DeepSpeed's save: the model-states file is written, then cut to half its size
              (a torn write), and the process dies before its optimizer shard is written;
- ``marker``  every shard of every rank is on disk, just before the completeness marker;
- ``latest``  the marker is written, ``latest.tmp`` too, just before it replaces ``latest``.

RELBERT_DS_TEST_RAISE=load makes this rank raise a plain RuntimeError (not a user error) while the
trainer loads its training data, inside the start-up checks every rank agrees on.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

point, _, nth = os.environ.get("RELBERT_DS_TEST_KILL", ":0").partition(":")
count = {"n": 0}


def _reached() -> bool:
    count["n"] += 1
    return count["n"] == int(nth)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    import torch

    from relbert_ds.training import checkpointing

    if point in ("rng", "engine"):
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            name = Path(str(f)).name
            if point == "rng" and name.startswith("rng_state_rank") and _reached():
                _die()
            result = real_save(obj, f, *args, **kwargs)
            if point == "engine" and name.endswith("model_states.pt") and _reached():
                path = Path(str(f))
                with open(path, "r+b") as handle:
                    handle.truncate(path.stat().st_size // 2)
                _die()
            return result

        torch.save = save
    elif point == "marker":
        real_write_json = checkpointing.write_json

        def write_json(path, data):
            if Path(path).name == checkpointing.MARKER and _reached():
                _die()
            return real_write_json(path, data)

        checkpointing.write_json = write_json
    elif point == "latest":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(str(dst)).name == checkpointing.LATEST and _reached():
                _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif point:
        raise SystemExit(f"unknown RELBERT_DS_TEST_KILL point {point!r}")
    if os.environ.get("RELBERT_DS_TEST_RAISE") == "load":
        from relbert_ds.data import training_sources

        def load(*args, **kwargs):
            raise RuntimeError("injected fault while loading the training data")

        training_sources.load_relation_dataset = load


if __name__ == "__main__":
    _install()
    from relbert_ds.cli.train import main

    sys.exit(main())
