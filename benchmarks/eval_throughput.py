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

The probe table (``--probe_table``): the full bundled table (every bundled analogy set, valid
and test, plus BLESS and K&H+N) for one model through the evaluator with the torch probe, split
into encoding and probe time, its vectors kept in a cache; then, on those same vectors, the
torch probe against the scikit-learn probe on BLESS and K&H+N for several seeds: time of each
and the F1 difference (``--subset N`` cuts every split of BLESS and K&H+N to its first N pairs,
every label keeping its share, for a shared CPU; the analogy sets stay whole). The results go into
the ``probe_table`` entry of the results JSON (the rest of the file is kept) and
docs/PROBE_AGREEMENT.md is the table it prints.

    python benchmarks/eval_throughput.py
    python benchmarks/eval_throughput.py --nprocs 1 2 --repeats 5 --with_classification
    python benchmarks/eval_throughput.py --probe_table --seeds 0 1 2
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
    p.add_argument("--probe_table", action="store_true",
                   help="measure the full bundled table and the torch vs sklearn probes instead (see above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds (--probe_table)")
    p.add_argument("--trained_seeds", type=int, nargs="+", default=None,
                   help="probe seeds of the trained model (default: --seeds)")
    p.add_argument("--arms", nargs="+", default=["fast", "paper", "sklearn"], choices=("fast", "paper", "sklearn"),
                   help="probe arms of --probe_table: torch fast protocol, torch paper protocol, sklearn (paper)")
    p.add_argument("--probe_datasets", nargs="+", default=["BLESS", "KHN"], choices=("BLESS", "KHN"),
                   help="classification sets of --probe_table (default both)")
    p.add_argument("--subset", type=int, default=0,
                   help="cut each split of BLESS and K&H+N to this many pairs, stratified (0 = all)")
    p.add_argument("--trained_model", default=None,
                   help="also compare the probes on this trained model's vectors (default: the newest "
                        "runs/*/best_model, if any)")
    p.add_argument("--cache_dir", default=None, help="vector cache of --probe_table (default: a temporary folder)")
    p.add_argument("--work_dir", default=None,
                   help="--probe_table's working folder (kept): an evaluator result already in it is reused, a "
                        "<label>.npz of vectors (arrays pairs, model_vectors) without its <label>.json is taken as "
                        "given (the probes only), and finished probe runs (probe_runs/) are not run again")
    p.add_argument("--compare_only", action="store_true",
                   help="skip the evaluator: take the vectors of the table from --cache_dir (the entry whose pair "
                        "list matches) and only compare the probes")
    p.add_argument("--probe_workers", type=int, default=1,
                   help="processes comparing the probes at once (each runs torch then sklearn for one dataset "
                        "and seed, so both probes of a pair see the same load)")
    p.add_argument("--_naive_worker", default=None, help=argparse.SUPPRESS)
    return p


def load_sets(analogy: Optional[Sequence[str]], splits: Sequence[str]) -> list[Any]:
    """The analogy datasets the evaluator will load (bundled defaults lacking a split skipped)."""
    from relbert_ds import evaluation

    names = ["validation" if s == "valid" else s for s in splits]
    return evaluation.prepare_tasks(analogy=analogy, classification="none", split=names).analogy


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


# --------------------------------------------------------------------------- probe table


def _classification_sets(n: int, work: Path, names: Sequence[str] = ("BLESS", "KHN")) -> list[str]:
    """``names`` (of BLESS and K&H+N): their bundled names, or folders of their splits cut to ``n`` pairs
    each (the first pairs of each label, every label keeping its share)."""
    from relbert_ds.data import load_classification_dataset

    if not n:
        return list(names)
    out = []
    for name in names:
        folder = work / f"{name}_subset{n}"
        folder.mkdir(parents=True, exist_ok=True)
        for split, pairs in load_classification_dataset(name).splits.items():
            by_label: dict[str, list] = {}
            for p in pairs:
                by_label.setdefault(p.relation, []).append(p)
            keep = [p for group in by_label.values() for p in group[:max(1, round(n * len(group) / len(pairs)))]]
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"head": p.head, "tail": p.tail, "relation": p.relation}) + "\n" for p in keep))
        out.append(str(folder))
    return out


def _full_table(model: str, label: str, classification: Sequence[str], cache_dir: Path,
                out_dir: Path) -> tuple[dict, Path]:
    """The evaluator on the bundled table (1 process, every core); returns its timing and the vectors file."""
    out, vectors = out_dir / f"{label}.json", out_dir / f"{label}.npz"
    if out.is_file() and vectors.is_file():  # --work_dir of an earlier, interrupted call
        return _table_timing(json.loads(out.read_text()), None), vectors
    cmd = [sys.executable, "launchers/evaluate.py", "--model", model, "--split", "valid", "test",
           "--classification", *classification, "--cache_dir", str(cache_dir), "--vectors", str(vectors),
           "--output", str(out)]
    with common.Phase() as phase:
        common.run(cmd, timeout=7200)
    return _table_timing(json.loads(out.read_text()), phase.record["seconds"]), vectors


def _vectors_from_cache(classification: Sequence[str], cache_dir: Path, vectors: Path) -> dict:
    """Write the table of the evaluator's pair list (bundled analogy + ``classification``, valid and test) from
    the cache entry that holds it; returns what is known of its timing (the entry's write time)."""
    import numpy as np

    from relbert_ds import evaluation
    from relbert_ds.evaluation.cache import pairs_hash

    pairs = evaluation.prepare_tasks(analogy=None, classification=list(classification),
                                 split=["validation", "test"]).pairs()
    wanted = pairs_hash(pairs)
    for entry in sorted(cache_dir.glob("*.npz")):
        with np.load(entry, allow_pickle=False) as data:
            key = json.loads(str(data["key"]))
            if key.get("pairs") == wanted:
                np.savez(vectors, pairs=np.array(pairs, dtype=str).reshape(-1, 2), model_vectors=data["table"])
                return {"from_cache": str(entry), "n_pairs": len(pairs), "cache_written_utc": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.stat().st_mtime))}
    raise SystemExit(f"no entry of {cache_dir} holds this table's {len(pairs)} pairs; run without --compare_only")


def _table_timing(doc: dict, process_wall_s: Optional[float]) -> dict:
    res = doc["models"]["model"]
    return {"process_wall_s": process_wall_s, "evaluator_wall_s": doc["wall_time_s"],
              "cache_hit": res.get("cache_hit"), "n_pairs": res["n_pairs"], **res["timing"],
              "classification_time_s": {k: v["time_s"] for k, v in res["classification"].items()},
              "probe": res.get("probe"), "threads": doc.get("threads_per_rank"),
              "metrics": {k: v for k, v in res["metrics"].items() if k.endswith(("accuracy", "f1_macro"))}}


PROBE_ARMS = {"fast": ("torch", "fast"), "paper": ("torch", "paper"), "sklearn": ("sklearn", "paper")}


def _probe_run(job: tuple[str, str, int, str, str]) -> dict:
    """One probe arm on one dataset and seed (test split), one thread; the result is kept in ``out`` so an
    interrupted table resumes where it stopped."""
    import torch

    from relbert_ds.data import load_classification_dataset
    from relbert_ds.evaluation.classification import ProbeOptions, run_classification

    vectors, source, seed, arm, out = job
    if Path(out).is_file():
        return json.loads(Path(out).read_text())
    torch.set_num_threads(1)
    lookup = common.vectors_lookup(vectors)
    dataset = load_classification_dataset(source)
    probe, protocol = PROBE_ARMS[arm]
    load_before = common.loadavg()
    t, cpu = time.perf_counter(), time.process_time()
    res = run_classification(dataset, lookup, split="test",
                             options=ProbeOptions(probe=probe, protocol=protocol, seed=seed, blas_threads=1))
    # CPU seconds as well as wall seconds: on a shared CPU the wall time mostly measures the neighbours.
    row = {"dataset": dataset.name, "seed": seed, "arm": arm, "probe": probe, "protocol": protocol,
           "n_train": len(dataset.splits["train"]), "n_test": len(dataset.splits["test"]),
           "time_s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu,
           "f1_macro": res["f1_macro"], "f1_micro": res["f1_micro"], "accuracy": res["accuracy"],
           "config": res["config"], "grid": res["grid"], "loadavg_before": load_before,
           "loadavg_after": common.loadavg()}
    print(f"{dataset.name} seed {seed} {arm}: macro F1 {100 * res['f1_macro']:.2f} in {row['cpu_s']:.1f} CPU s",
          file=sys.stderr, flush=True)
    common.write_json(Path(out), row)
    return row


def _compare_probes(vectors: Path, seeds: Sequence[int], classification: Sequence[str], workers: int,
                    arms: Sequence[str], runs_dir: Path, label: str) -> dict:
    """Every probe arm on each classification set and seed, on the same vectors; differences to sklearn."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(vectors), source, seed, arm, str(runs_dir / f"{label}_{Path(source).name}_{seed}_{arm}.json"))
            for seed in seeds for source in classification for arm in arms]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_probe_run, jobs))
    else:
        rows = [_probe_run(job) for job in jobs]
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        runs = [r for r in rows if r["dataset"] == name]
        by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}
        entry: dict[str, Any] = {"n_train": runs[0]["n_train"], "n_test": runs[0]["n_test"], "runs": runs}
        for arm, rs in by_arm.items():
            entry[arm] = {"f1_macro": common.summary(100 * r["f1_macro"] for r in rs),
                          "cpu_s": common.summary(r["cpu_s"] for r in rs),
                          "time_s": common.summary(r["time_s"] for r in rs),
                          "epochs": common.summary(sum(g["n_iter"] for g in r["grid"]) for r in rs)}
        if "sklearn" in by_arm:
            for arm in arms:
                if arm != "sklearn":
                    entry[f"{arm}_minus_sklearn_points"] = (entry[arm]["f1_macro"]["mean"]
                                                            - entry["sklearn"]["f1_macro"]["mean"])
                    entry[f"{arm}_speedup_cpu"] = entry["sklearn"]["cpu_s"]["median"] / entry[arm]["cpu_s"]["median"]
        out[name] = entry
    return out


def _newest_trained_model() -> Optional[str]:
    found = sorted(Path("runs").glob("*/best_model/config.json"), key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent) if found else None


def probe_table(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    head = common.header("eval_throughput", argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="relbert_ds_probe_table_"))
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    trained = args.trained_model or _newest_trained_model()
    models = {"backbone": args.model, **({"trained": trained} if trained else {})}
    classification = _classification_sets(args.subset, work, args.probe_datasets)
    seeds = {"backbone": args.seeds, "trained": args.trained_seeds or args.seeds}
    section: dict[str, Any] = {**head, "config": {"seeds": seeds, "subset": args.subset, "models": models,
                                                  "classification": classification},
                               "trained_model_note": None if trained else "no trained model under runs/*/best_model"}
    rows, agreement = [], []
    for label, model in models.items():
        if (work / f"{label}.npz").is_file() and not (work / f"{label}.json").is_file():
            vectors = work / f"{label}.npz"  # supplied (pairs, model_vectors): the probes only
            section[f"{label}_vectors"] = {"supplied": str(vectors)}
        elif args.compare_only:
            vectors = work / f"{label}.npz"
            section[f"{label}_vectors"] = _vectors_from_cache(classification, cache_dir, vectors)
        else:
            timing, vectors = _full_table(model, label, classification, cache_dir, work)
            section[f"{label}_full_table"] = timing
            alone = timing.get("encoding_alone_s", timing["encode_s"])  # results of before the shared queue
            probes = sum(timing["classification_time_s"].values())
            rows.append([label, timing["n_pairs"], f"{alone:.0f}", f"{probes:.0f}",
                         f"{timing['total_s']:.0f}", f"{timing['total_s'] - alone:.1f}"])
        compared = _compare_probes(vectors, seeds[label], classification, args.probe_workers, args.arms,
                                   work / "probe_runs", label)
        section[f"{label}_probes"] = compared
        for name, c in compared.items():
            for arm in args.arms:
                f1, cpu = c[arm]["f1_macro"], c[arm]["cpu_s"]
                agreement.append([label, name, c["n_train"], arm, f1["n"],
                                  f"{f1['mean']:.2f} [{f1['min']:.2f}-{f1['max']:.2f}]",
                                  "" if arm == "sklearn" or "sklearn" not in c else
                                  f"{c[f'{arm}_minus_sklearn_points']:+.2f}",
                                  f"{c[arm]['epochs']['median']:.0f}", f"{cpu['median']:.1f}",
                                  "" if arm == "sklearn" or "sklearn" not in c else f"{c[f'{arm}_speedup_cpu']:.1f}x"])
    sets = " and ".join("K&H+N" if n == "KHN" else n for n in args.probe_datasets)
    what = f"{sets} full" if not args.subset else f"{sets} cut to {args.subset} pairs per split"
    table = ((f"Bundled table ({what}; analogy sets whole), 1 process (the evaluator's own timing, s):\n"
              + common.markdown_table(["model", "unique pairs", "encoding alone s", "probes s (torch, summed)",
                                       "whole table s", "on top of the encoding s"], rows) + "\n" if rows else
              f"Vectors of the bundled table ({what}) supplied in --work_dir or read from the cache.\n")
             + "Probes on the same vectors (test split, macro F1 in points: mean [min-max] over seeds; "
               "epochs summed over the 9 grid points; one thread each):\n"
             + common.markdown_table(["model", "dataset", "train pairs", "arm", "seeds", "macro F1",
                                      "mean - sklearn's", "epochs", "CPU s", "speed-up vs sklearn (CPU)"],
                                     agreement)
             + f"\nload average {head['loadavg_start']} -> {common.loadavg()} (shared CPU: times are upper bounds)"
             + ("" if trained else "; no trained model under runs/*/best_model, backbone only") + "\n")
    section["table_markdown"] = table
    path = Path(args.output or common.default_output("eval_throughput"))
    document = json.loads(path.read_text()) if path.is_file() else {}
    document["probe_table"] = section
    common.write_json(path, document)
    print(table, flush=True)
    print(f"results: {path} (probe_table)", flush=True)
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args._naive_worker:
        return naive_worker(args._naive_worker)
    if args.probe_table:
        return probe_table(args, argv)
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
                # With classification sets the probes share the ranks with part of the encoding: the encoding's
                # own time is encoding_alone_s (the forwards' time; absent from results of older versions).
                sample = {"encode_s": model["timing"].get("encoding_alone_s", model["timing"]["encode_s"]),
                          "process_wall_s": phase.record["seconds"],
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
