#!/usr/bin/env python
"""Evaluator throughput: relbert-ds's sharded evaluator on 1 and 2 ranks (really launched) vs a
naive per-question encoder, side by side, interleaved repetitions.

Arms:

- ``ranks=N``: ``launchers/evaluate.py`` started by ``torchrun`` with N local ranks (threads per
  rank = cores / N, the evaluator's default), on the bundled analogy sets (valid and test
  splits; ``--with_classification`` adds BLESS and K&H+N). Its own timing of the encoding
  (``timing.encode_s``: unique pairs, length-bucketed, sharded, gathered) is the figure; the
  process wall time (imports, data and model loading) is reported beside it.
- ``naive``: one process, all cores, each question encoded on its own (stem + choices in one
  forward), no de-duplication, no length bucketing, prompts padded to max_length 64 as the
  public relbert code tokenizes (``--naive_padding longest`` to pad per question only). Same
  encoder and pooling; its accuracies are checked against the evaluator's.

pairs/s counts every pair the questions hold (duplicates included: what a user's data
contains); unique pairs/s counts what the evaluator actually encodes.

    python benchmarks/eval_throughput.py
    python benchmarks/eval_throughput.py --nprocs 1 2 --repeats 5 --with_classification
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--analogy", nargs="+", default=None, help="analogy sets (default: all bundled)")
    p.add_argument("--split", nargs="+", default=["valid", "test"], help="splits (default valid test)")
    p.add_argument("--with_classification", action="store_true",
                   help="also encode BLESS and K&H+N (about 85k pairs; the naive arm skips them)")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="rank counts (default 1 2)")
    p.add_argument("--launcher", default="torchrun", choices=("torchrun", "deepspeed"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--no_naive", action="store_true")
    p.add_argument("--naive_padding", default="max_length", choices=("max_length", "longest"))
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/eval_throughput.json)")
    p.add_argument("--_naive_worker", default=None, help=argparse.SUPPRESS)
    return p


def load_sets(analogy: Optional[Sequence[str]], splits: Sequence[str]) -> list[Any]:
    """The analogy datasets the evaluator will load (bundled defaults lacking a split skipped)."""
    from relbert_ds.evaluation import runner

    names = ["validation" if s == "valid" else s for s in splits]
    return runner.prepare_tasks(analogy=analogy, classification="none", split=names).analogy


def question_pairs(datasets: Sequence[Any]) -> tuple[int, int]:
    """(pairs with duplicates, unique pairs) of the analogy datasets."""
    from relbert_ds.evaluation.analogy import analogy_pairs

    pairs = [p for d in datasets for p in analogy_pairs(d.questions)]
    return len(pairs), len(set(pairs))


# --------------------------------------------------------------------------- naive arm


def naive_worker(spec: str) -> int:
    """Run the naive encoder (in its own process) and write timing + accuracies to a JSON."""
    cfg = json.loads(spec)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    import torch

    from relbert_ds import RelationEncoder
    from relbert_ds.evaluation.analogy import answer_question

    torch.set_num_threads(os.cpu_count() or 1)
    encoder = RelationEncoder.from_pretrained(cfg["model"])
    encoder.eval()
    datasets = load_sets(cfg["analogy"], cfg["split"])
    load_s = time.perf_counter() - start
    accuracies, pairs = {}, 0
    t = time.perf_counter()
    with torch.inference_mode():
        for data in datasets:
            credit = 0.0
            for q in data.questions:
                batch = [q.stem, *q.choices]
                kwargs: dict[str, Any] = {"truncation": True, "max_length": encoder.max_length,
                                          "return_tensors": "pt", "return_token_type_ids": False,
                                          "padding": "max_length" if cfg["padding"] == "max_length" else True}
                tokens = encoder.tokenizer(encoder.prompts(batch), **kwargs)
                vectors = encoder(tokens["input_ids"], tokens["attention_mask"]).float().numpy()
                credit += answer_question(vectors[0], vectors[1:], q.answer).credit
                pairs += len(batch)
            accuracies[f"analogy/{data.name}/{data.split}/accuracy"] = credit / len(data.questions)
    encode_s = time.perf_counter() - t
    Path(cfg["output"]).write_text(json.dumps({"encode_s": encode_s, "load_s": load_s, "pairs": pairs,
                                               "threads": torch.get_num_threads(), "accuracies": accuracies,
                                               "wall_time_s": time.perf_counter() - start}))
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args._naive_worker:
        return naive_worker(args._naive_worker)
    head = common.header("eval_throughput", argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = load_sets(args.analogy, args.split)
    n_pairs, n_unique = question_pairs(datasets)
    tmp = Path(tempfile.mkdtemp(prefix="relbert_ds_eval_tp_"))
    arms = [f"ranks={n}" for n in args.nprocs] + ([] if args.no_naive else ["naive"])
    samples: dict[str, list[dict]] = {a: [] for a in arms}
    reps = []
    for rep in range(args.repeats):
        order = arms[rep % len(arms):] + arms[:rep % len(arms)]
        record: dict[str, Any] = {"repeat": rep, "order": order, "loadavg_before": common.loadavg()}
        for arm in order:
            out = tmp / f"{arm}_{rep}.json"
            if arm == "naive":
                spec = json.dumps({"model": args.model, "analogy": args.analogy, "split": args.split,
                                   "padding": args.naive_padding, "output": str(out)})
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_naive_worker", spec]
                with common.Phase() as phase:
                    common.run(cmd, timeout=3600, env=common.rank_env(OMP_NUM_THREADS=str(os.cpu_count() or 1)))
                res = json.loads(out.read_text())
                sample = {"encode_s": res["encode_s"], "process_wall_s": phase.record["seconds"],
                          "pairs_encoded": res["pairs"], "accuracies": res["accuracies"], "threads": res["threads"]}
            else:
                nproc = int(arm.split("=")[1])
                eval_args = ["--model", args.model, "--split", *args.split, "--batch_size", str(args.batch_size),
                             "--output", str(out)]
                if args.analogy:
                    eval_args += ["--analogy", *args.analogy]
                if not args.with_classification:
                    eval_args += ["--classification", "none"]
                cmd = common.launch_cmd("launchers/evaluate.py", eval_args, nproc, args.launcher)
                with common.Phase() as phase:
                    common.run(cmd, timeout=3600)
                doc = json.loads(out.read_text())
                model = doc["models"]["model"]
                sample = {"encode_s": model["timing"]["encode_s"], "process_wall_s": phase.record["seconds"],
                          "evaluator_wall_s": doc["wall_time_s"], "pairs_encoded": model["n_pairs"],
                          "classification_s": model["timing"].get("classification_s"),
                          "threads_per_rank": doc.get("threads_per_rank"), "world_size": doc["world_size"],
                          "accuracies": {k: v for k, v in model["metrics"].items()
                                         if k.startswith("analogy/") and k.endswith("/accuracy")
                                         and "/full/" not in k}}
            samples[arm].append(sample)
            record[f"{arm}_encode_s"] = sample["encode_s"]
        record["loadavg_after"] = common.loadavg()
        reps.append(record)
        print(f"repeat {rep}: " + ", ".join(f"{k}={v:.2f}" for k, v in record.items() if isinstance(v, float)),
              file=sys.stderr, flush=True)

    base_pairs = n_pairs
    stats: dict[str, Any] = {}
    for arm in arms:
        enc = [s["encode_s"] for s in samples[arm]]
        stats[arm] = {"encode_s": common.summary(enc), "process_wall_s": common.summary(s["process_wall_s"]
                                                                                         for s in samples[arm]),
                      "pairs_encoded": samples[arm][0]["pairs_encoded"],
                      "question_pairs_per_s": common.summary(base_pairs / e for e in enc),
                      "encoded_pairs_per_s": common.summary(samples[arm][0]["pairs_encoded"] / e for e in enc)}
    ratios: dict[str, Any] = {}
    one = "ranks=1" if "ranks=1" in arms else None
    for arm in arms:
        if one and arm not in (one, "naive"):
            ratios[f"{one} / {arm} (encode time)"] = common.ratio_summary(
                [r[f"{one}_encode_s"] for r in reps], [r[f"{arm}_encode_s"] for r in reps])
        if "naive" in arms and arm != "naive":
            ratios[f"naive / {arm} (encode time)"] = common.ratio_summary(
                [r["naive_encode_s"] for r in reps], [r[f"{arm}_encode_s"] for r in reps])
    # Correctness: the naive encoder and the evaluator must agree on every analogy accuracy.
    agreement = None
    if "naive" in arms and one:
        a, b = samples["naive"][0]["accuracies"], samples[one][0]["accuracies"]
        common_keys = sorted(set(a) & set(b))
        agreement = {"datasets": common_keys,
                     "max_abs_difference": max((abs(a[k] - b[k]) for k in common_keys), default=None)}

    def cell(s: dict, digits: int = 1) -> str:
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    def label(arm: str) -> str:
        if arm == "naive":
            return f"naive per question (1 process, no de-dup, pad to {args.naive_padding})"
        return f"relbert-ds evaluator, {arm.split('=')[1]} rank(s) ({args.launcher})"

    rows = [[label(arm),
             stats[arm]["pairs_encoded"], cell(stats[arm]["encode_s"]), cell(stats[arm]["question_pairs_per_s"], 0),
             cell(stats[arm]["encoded_pairs_per_s"], 0), cell(stats[arm]["process_wall_s"])] for arm in arms]
    table = common.markdown_table(["arm", "pairs encoded", "encode s", "question pairs/s", "encoded pairs/s",
                                   "process wall s"], rows)
    table += "\n" + common.markdown_table(["ratio (median [min-max] over repetitions)", "value"],
                                          [[k, cell(v, 2)] for k, v in ratios.items()])
    sets = ", ".join(f"{d.name}/{d.split}" for d in datasets)
    table += (f"\n{n_pairs} question pairs ({n_unique} unique) in {sets}"
              + (" + BLESS/K&H+N (ranks arms only)" if args.with_classification else "")
              + f"; batch {args.batch_size}; {args.repeats} interleaved repetitions; load average "
              f"{head['loadavg_start']} -> {common.loadavg()}.\n")
    if agreement and agreement["max_abs_difference"] is not None:
        table += f"Naive vs evaluator accuracies: max difference {100 * agreement['max_abs_difference']:.2f} points.\n"
    document = {**head, "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                "datasets": sets, "question_pairs": n_pairs, "unique_pairs": n_unique, "arms": stats,
                "ratios": ratios, "repeats": reps, "samples": samples, "accuracy_agreement": agreement}
    common.emit(table, Path(args.output or common.default_output("eval_throughput")), document)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
