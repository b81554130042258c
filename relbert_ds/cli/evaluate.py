"""Command line of the sharded evaluator (``launchers/evaluate.py``, ``relbert-ds-evaluate``).

    python launchers/evaluate.py --model all-MiniLM-L6-v2 --template d --pooling average_no_mask
    torchrun --standalone --nproc_per_node 2 launchers/evaluate.py --model runs/x/export --baseline all-MiniLM-L6-v2
    deepspeed --num_gpus 2 --master_port 29611 launchers/evaluate.py --model runs/x/export --output results.json

Order of work (every rank): parse options, join the process group, load and validate every
dataset, check the model names, and only then load the model(s) and encode. Any user error is
raised on every rank and printed once, on rank 0, as ``error: <message>``; the exit code is 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from relbert_ds.errors import ConfigError

SPLIT_CHOICES = ("test", "valid", "validation")


class _Parser(argparse.ArgumentParser):
    """argparse that raises a ConfigError (printed once, on rank 0) instead of exiting on every rank."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; fix: see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launchers/evaluate.py", description=(
        "Evaluate RelBERT relation embeddings on analogy questions, lexical relation classification and "
        "relation mapping, sharded over all ranks of the job (plain python = 1 rank, torchrun, deepspeed, "
        "mpirun, srun)."))
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                   help="a Hugging Face folder (relbert-ds or relbert format), a trainer checkpoint (<run>/checkpoints "
                        "= its latest, or <run>/checkpoints/global_step<N>; any ZeRO stage), a hub id, or a "
                        "backbone name (all-MiniLM-L6-v2 = the bundled backbone) used zero-shot with "
                        "--template/--pooling")
    m.add_argument("--template", default=None,
                   help="prompt template: a-e or a text with <subj>, <obj> (and <mask>); default: the model's "
                        "saved relbert_config, else d")
    m.add_argument("--pooling", default=None, help="average_no_mask (default), average, mask or last")
    m.add_argument("--max_length", type=int, default=None, help="prompt token limit (default: saved, else 64)")
    m.add_argument("--override_prompt", action="store_true",
                   help="evaluate a trained RelBERT model with a --template/--pooling other than the one it was "
                        "trained with (an ablation; refused otherwise)")
    m.add_argument("--baseline", default=None, metavar="PATH_OR_NAME",
                   help="a second model evaluated in the same call (e.g. the untrained backbone); the table "
                        "shows both side by side")
    m.add_argument("--baseline_template", default=None, help="default: the --model's template")
    m.add_argument("--baseline_pooling", default=None, help="default: the --model's pooling")
    d = p.add_argument_group("data")
    d.add_argument("--analogy", nargs="+", default=None, metavar="SOURCE",
                   help="analogy datasets: bundled names (sat u2 u4 google bats), the paper's other sets by name "
                        "(t_rex_relational_similarity conceptnet_relational_similarity nell_relational_similarity "
                        "scan), hub ids (relbert/analogy_questions:sat), folders of valid/test.jsonl, or files; "
                        "default: all bundled; 'none' skips")
    d.add_argument("--classification", nargs="+", default=None, metavar="SOURCE",
                   help="lexical relation classification datasets: bundled names (BLESS KHN), the paper's other "
                        "sets by name (CogALexV EVALution ROOT09), hub ids "
                        "(relbert/lexical_relation_classification:BLESS), or folders of train/validation/test.jsonl; "
                        "default: both bundled; 'none' skips")
    d.add_argument("--preset", default=None, choices=("paper",),
                   help="paper: every analogy and classification set of the RelBERT paper's table, by hub id "
                        "(replaces the --analogy/--classification defaults; offline, supply them with --data_dir), "
                        "with --probe_protocol paper unless another protocol is named")
    d.add_argument("--data_dir", default=None, metavar="DIR",
                   help="where hub datasets are looked for first, laid out as DIR/<owner>/<name>/<config>/"
                        "<split>.jsonl (e.g. DIR/relbert/analogy_questions/sat/test.jsonl); default: "
                        "$RELBERT_DS_DATA")
    d.add_argument("--mapping", nargs="+", default=None, metavar="FILE",
                   help='relation-mapping JSONL files ({"source": [...], "target": [...]} per line)')
    d.add_argument("--split", nargs="+", default=["test"], choices=SPLIT_CHOICES,
                   help="split(s) to report (default test; 'valid test' also gives SAT-full). A bundled default "
                        "lacking the split is shown as n/a; an explicitly named dataset lacking it is an error")
    r = p.add_argument_group("run")
    r.add_argument("--batch_size", type=int, default=64, help="prompts per forward (default 64)")
    r.add_argument("--max_iter", type=int, default=200,
                   help="MLPClassifier max_iter for the classification probe (sklearn default 200)")
    r.add_argument("--seed", type=int, default=0, help="random_state of the classification probe")
    r.add_argument("--probe", default="torch", choices=("torch", "sklearn"),
                   help="classification probe: torch (default; the 9-point grid trained as one batched model, on "
                        "the GPU when there is one, datasets split over ranks) or sklearn (MLPClassifier, the "
                        "reference; configurations split over ranks)")
    r.add_argument("--probe_protocol", default=None, choices=("fast", "paper"),
                   help="fast (the torch probe's default): successive halving, the grid cut to its best 3 "
                        "points by validation macro F1 after 3 epochs and to the best 1 after 10, the points kept "
                        "trained as in paper; paper (sklearn's only one): every grid point trains to "
                        "MLPClassifier's stopping rule (docs/PROBE_AGREEMENT.md compares them)")
    r.add_argument("--probe_features", default="mean", choices=("mean", "sum"),
                   help="pooled vectors fed to the probe: mean (relbert-ds's pooling, default) or sum (the public "
                        "relbert code's summed pooling: each vector times its pooled token count)")
    r.add_argument("--cache_dir", default=None, metavar="DIR",
                   help="cache the relation vectors here, keyed by model weights, prompt, pooling, max_length and "
                        "pair list: a re-run that changes only the probe does not encode again")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (encoding), and parallel sklearn classifier fits per rank "
                        "(default: CPU cores / ranks on this node); the torch probe always trains on one thread "
                        "(more would change its numbers with the number of ranks)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="report the encoding's and the probes' progress (rank 0): a bar on a terminal, a line every "
                        "RELBERT_DS_PROGRESS_EVERY seconds (30) in a log file")
    o = p.add_argument_group("outputs")
    o.add_argument("--output", default=None, metavar="FILE.json", help="results JSON")
    o.add_argument("--tensorboard_dir", default=None, help="write the metrics as TensorBoard scalars here")
    o.add_argument("--predictions", default=None, metavar="FILE.jsonl", help="per-question predictions")
    o.add_argument("--vectors", default=None, metavar="FILE.npz",
                   help="save the table of relation vectors every metric came from (arrays: pairs, "
                        "<model>_vectors)")
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}; fix: pass a positive number")
    if args.max_iter < 1:
        raise ConfigError(f"--max_iter must be >= 1, got {args.max_iter}; fix: pass a positive number")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    return args


# --------------------------------------------------------------------------- main


def _device(local_rank: int) -> Any:
    import torch

    # The GPU the process group chose (parallel.distributed: cuda:0 when a rank sees one GPU), not
    # cuda:<local_rank>, which does not exist under --gpus-per-task=1 or per-rank MPI wrappers.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _run(args: argparse.Namespace, info: Any, start: float) -> int:

    import relbert_ds
    from relbert_ds.evaluation import classification as classification_mod
    from relbert_ds.evaluation.classification import ProbeOptions
    from relbert_ds.evaluation.report import markdown_table, write_outputs
    from relbert_ds.evaluation.runner import EncodingOptions, evaluate_tasks
    from relbert_ds.evaluation.tasks import prepare_tasks
    from relbert_ds.parallel import distributed
    from relbert_ds.training.model_specs import resolve_model, zero_shot_like

    # The paper's table gets the paper's probe protocol unless another one is named. Checked before any
    # loading, agreed so that one rank reports it.
    protocol = args.probe_protocol or ("paper" if args.preset == "paper" else None)
    protocol = distributed.agree(lambda: classification_mod.check_probe(args.probe, args.probe_features, protocol))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-rank "Loading weights" bars: carriage returns in every log
    threads = distributed.set_threads(args.threads, info.local_world_size)
    splits = [("validation" if s == "valid" else s) for s in args.split]
    analogy, classification = args.analogy, args.classification
    if args.preset == "paper":
        from relbert_ds.data.sources import PAPER_ANALOGY, PAPER_CLASSIFICATION

        analogy = analogy if analogy is not None else list(PAPER_ANALOGY)
        classification = classification if classification is not None else list(PAPER_CLASSIFICATION)
    tasks = prepare_tasks(analogy=analogy, classification=classification, mapping=args.mapping, split=splits,
                          data_dir=args.data_dir)
    specs = {"model": (args.model, args.template, args.pooling)}
    if args.baseline:
        specs["baseline"] = (args.baseline, args.baseline_template, args.baseline_pooling)
    resolved = {label: distributed.agree(lambda spec=spec: resolve_model(*spec, args.max_length,
                                                                          override_prompt=args.override_prompt))
                for label, spec in specs.items()}
    # Every rank scores from the same inputs (per-node copies of the data or the model can differ).
    from relbert_ds.training.same_inputs import analogy_and_model_digests, check_same_inputs, digest_of

    def fingerprints() -> dict[str, str]:
        out = analogy_and_model_digests(tasks.analogy, {spec: resolved[label].resolved
                                                        for label, (spec, _, _) in specs.items()})
        out.update({f"classification set {getattr(d, 'name', i)}/{split}": digest_of(d)
                    for i, (d, split) in enumerate(tasks.classification)})
        return out

    check_same_inputs(fingerprints)
    device = _device(info.local_rank)
    encoding = EncodingOptions(batch_size=args.batch_size, show_progress=args.progress, cache_dir=args.cache_dir)
    # sklearn: one thread per fit (workers run several); the torch probe always trains on one CPU thread
    # (classification.TORCH_PROBE_THREADS: more would change its numbers).
    probe = ProbeOptions(probe=args.probe, features=args.probe_features, protocol=protocol, max_iter=args.max_iter,
                         seed=args.seed, device=device, blas_threads=1, workers=threads)
    results: dict[str, dict] = {}
    load_s: dict[str, float] = {}
    encoder = None
    for label, model in resolved.items():
        if label == "baseline":
            model = zero_shot_like(model, encoder)
        del encoder  # one model in memory at a time
        t = time.perf_counter()
        encoder = distributed.agree(lambda model=model: model.load(device))
        load_s[label] = time.perf_counter() - t
        results[label] = evaluate_tasks(encoder, tasks, encoding, probe, keep_predictions=bool(args.predictions),
                                        keep_vectors=bool(args.vectors))
        results[label]["model"].update(path=model.resolved, kind=model.kind)
    header = {
        "relbert_ds_version": relbert_ds.__version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name] + list(sys.argv[1:]),
        "world_size": info.world_size,
        "launcher": info.launcher,
        "backend": info.backend,
        "device": str(device),
        "threads_per_rank": threads,
        "splits": list(tasks.splits),
        "options": {"batch_size": args.batch_size, "max_iter": args.max_iter, "seed": args.seed,
                    "probe": args.probe, "probe_features": args.probe_features,
                    "probe_protocol": protocol,
                    "preset": args.preset,
                    "cache_dir": args.cache_dir},
        "datasets": tasks.identities(),
        "missing": tasks.missing,
        "model_load_s": load_s,
        "wall_time_s": time.perf_counter() - start,
    }
    if args.vectors and distributed.is_main():
        _save_vectors(args.vectors, results)
    write_outputs(results, header, output=args.output, predictions=args.predictions,
                         tensorboard_dir=args.tensorboard_dir)
    if distributed.is_main():
        print(markdown_table(results), flush=True)
        print(f"wall time {header['wall_time_s']:.1f} s on {info.world_size} rank(s)"
              + (f"; results in {args.output}" if args.output else ""), flush=True)
    return 0


def _save_vectors(path: str, results: dict[str, dict]) -> None:
    import numpy as np

    arrays = {}
    for label, res in results.items():
        vectors = res.pop("vectors")
        arrays["pairs"] = np.array(vectors["pairs"], dtype=str).reshape(-1, 2)
        arrays[f"{label}_vectors"] = vectors["table"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the evaluator; returns the exit code (0, or 2 for a user error)."""
    from relbert_ds.cli.common import run_command

    start = time.perf_counter()

    def body(args: argparse.Namespace) -> int:
        from relbert_ds.parallel import distributed

        return _run(args, distributed.init_distributed(), start)

    return run_command(argv, parse_args, body)


def run() -> None:
    """Console-script entry point: ``main()`` then a clean process exit (see common.exit_process)."""
    from relbert_ds.cli.common import exit_process

    exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    run()
