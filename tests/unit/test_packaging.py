"""Packaging: the wheel carries the bundled data and the console scripts; ``python -m`` entry
points work; the torch version check refuses an old torch with one clear line."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from relbert_ds import _version_check

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


@pytest.mark.slow  # 15-40 s: a build, an install and a fresh interpreter that imports torch
def test_wheel_contains_bundled_data_and_console_scripts(tmp_path):
    # Built from a copy of the sources, so the build leaves nothing in the working tree; without
    # build isolation, so no index is needed (setuptools >= 70 builds wheels on its own).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "relbert_ds", src / "relbert_ds", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("relbert_ds-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        packaged_data = {n: archive.read(n) for n in names if n.startswith("relbert_ds/resources/")}
    data_root = ROOT / "relbert_ds" / "resources"
    expected = {f"relbert_ds/resources/{p.relative_to(data_root).as_posix()}": p.read_bytes()
                for p in data_root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert any(n.endswith("semeval2012/relations.json") for n in expected)
    assert sum(n.endswith(".jsonl") for n in expected) >= 10
    assert packaged_data == expected  # every bundled file, byte for byte, and nothing else
    for module in ("relbert_ds/cli/push.py", "relbert_ds/cli/plot.py", "relbert_ds/train.py",
                   "relbert_ds/evaluate.py", "relbert_ds/evaluation/runner.py"):
        assert module in names
    for script, target in _console_scripts().items():
        assert f"{script} = {target}" in entry_points
    assert {"relbert-ds-train", "relbert-ds-evaluate", "relbert-ds-push", "relbert-ds-plot"} <= set(_console_scripts())

    # Installed (not editable) into a bare folder and imported from there, away from the checkout:
    # the bundled data load from the installed copy.
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheels[0])], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import relbert_ds; "
             "from relbert_ds.data import load_analogy_dataset, load_relation_dataset; "
             "print(relbert_ds.__file__); print(len(load_analogy_dataset('sat', 'test').questions)); "
             "print(len(load_relation_dataset('semeval2012', 'train').relations))")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, sat_test, relations = proc.stdout.split()[-3:]
    assert where.startswith(str(target)) and int(sat_test) == 337 and int(relations) == 79


def test_torch_requirement_has_no_upper_bound():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    torch_lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines()
                   if line.strip().startswith("torch")]
    assert torch_lines == ["torch>=" + ".".join(map(str, _version_check.MIN_TORCH))]


@pytest.mark.parametrize("module", ["relbert_ds.train", "relbert_ds.evaluate", "relbert_ds.push", "relbert_ds.plot"])
def test_python_dash_m_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:")
    assert "--" in proc.stdout


def test_version_check():
    assert _version_check.parse_version("2.13.0+cpu") == (2, 13)
    assert _version_check.parse_version("2.4.1") == (2, 4)
    assert _version_check.parse_version("nightly") is None
    with pytest.raises(ImportError) as info:
        _version_check.check_torch("2.3.1+cu121")
    message = str(info.value)
    assert "\n" not in message and "torch>=2.4" in message and "2.3.1+cu121" in message and "fix:" in message
    with pytest.warns(UserWarning, match="older than the version relbert-ds is tested with"):
        _version_check.check_torch("2.6.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _version_check.check_torch("2.13.0")  # the tested version and newer ones pass silently
        _version_check.check_torch("3.1.0")
        _version_check.check_torch("nightly")
