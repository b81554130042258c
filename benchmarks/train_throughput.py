#!/usr/bin/env python
"""Training throughput, side by side in one process (world size 1): pairs/s, tokens/s, FLOP/s, MFU.

Arms, interleaved repetition by repetition (the order rotates every repetition):

- ``real``: the REAL public relbert 2.0.2 trainer (``relbert-train``, its recipe of
  the reference run of docs/PERFORMANCE.md) in its own venv and process (benchmarks/public_relbert.py; the venv is built
  on first use and its build time reported), paused between its optimizer steps: each
  repetition times ``--real_steps`` of its steps from here, and its epoch of 79 steps is
  extrapolated from them. Quoted first. ``--skip_real`` leaves it out (no venv needed).
- ``ours``: relbert-ds's real training step through the trainer's public API:
  ``Trainer(run).prepare()`` (DeepSpeed config resolution, model construction, loss, engine, the
  RelationAwareSampler) and ``trainer.train_step()`` per step (tokenize, engine forward + loss,
  engine backward, engine step, the per-step record with grad norm and throughput, its
  history line).
- ``bare``: plain PyTorch on EXACTLY the same token tensors (tokenized before the clock starts):
  the same encoder (backbone + pooling), loss = mean of the pooled output, ``loss.backward()``,
  torch AdamW; no DeepSpeed, no sampler, no relation loss, no clipping. ours/bare = the
  **overhead ratio** (target <= 1.10).
- ``public``: the public RelBERT trainer's scheme (benchmarks/arms.py): one relation
  per step, its positives + 400 negatives (own negatives and other relations' positives), all
  encoded, prompts padded to max_length 64 as there. ``public_longest``: the same scheme with
  prompts padded only to the longest in the step (isolates the scheme from the padding).
  Their epoch over SemEval-2012 (79 relations = 79 steps) is **extrapolated** from the steps
  timed in each repetition; ours is timed for whole epochs.

Negatives per encoded sequence are counted from the loss's own masks (relbert_ds.training.losses) for
every batch of an epoch, and from the public scheme's batches (every positive anchor against
every negative of its step).

    python benchmarks/train_throughput.py                                  # bundled MiniLM, ZeRO-2
    python benchmarks/train_throughput.py --repeats 5 --peak_tflops 0.2
    python benchmarks/train_throughput.py --skip_real                      # no relbert venv
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.arms import Bare, PublicScheme, PublicTrainer, build_ours, ours_step, upcoming_pairs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="backbone (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--relations_per_step", "--relations_per_rank", dest="relations_per_step", type=int, default=16,
                   help="relation groups per optimizer step (the global batch; default 16, the trainer's default)")
    p.add_argument("--positives_per_relation", type=int, default=8)
    p.add_argument("--negatives_per_relation", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--epochs_per_repeat", type=int, default=1,
                   help="our epochs (and bare replays) per repetition (default 1 = 5 steps on SemEval-2012)")
    p.add_argument("--max_steps_per_repeat", type=int, default=None,
                   help="cap our steps per repetition below an epoch (smoke tests)")
    p.add_argument("--public_steps", type=int, default=3, help="public-scheme steps timed per repetition (default 3)")
    p.add_argument("--public_negatives", type=int, default=400)
    p.add_argument("--public_positives", type=int, default=10)
    p.add_argument("--no_public", action="store_true", help="skip the public-scheme arms")
    p.add_argument("--skip_real", action="store_true",
                   help="leave the real relbert 2.0.2 arm out (no relbert venv needed; the smoke tests use this)")
    p.add_argument("--real_steps", type=int, default=3, help="real relbert steps timed per repetition (default 3)")
    p.add_argument("--relbert_venv", default=None,
                   help="the relbert 2.0.2 venv (default .relbert-venv in the repository; built on first use)")
    p.add_argument("--real_timeout_s", type=float, default=900, help="real arm: longest wait for one step")
    p.add_argument("--no_public_longest", action="store_true", help="skip the dynamic-padding variant")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="per-device peak for MFU (default: measured fp32 matmul peak of this CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--count_world_sizes", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="also count negatives/sequence for these world sizes x 8 relations per rank (no model)")
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/train_throughput.json)")
    return p


# --------------------------------------------------------------------------- arms


# --------------------------------------------------------------------------- counting


def count_ours(sampler: Any, epoch: int) -> dict[str, float]:
    """Anchor-negative pairs scored and sequences encoded over one epoch of ``sampler``'s plan,
    from the loss's own masks on the global batch (every rank's rows together: the masks of a
    W-rank run equal those of one process over the global batch)."""
    import torch

    from relbert_ds.training.losses import _GlobalBatch

    totals = {"sequences": 0, "anchors": 0, "anchor_negative_pairs": 0, "anchor_positive_pairs": 0,
              "own_negative_pairs": 0, "in_batch_negative_pairs": 0, "steps": 0}
    for step in range(sampler.steps_per_epoch):
        batch = sampler.batch_from_groups(sampler.plan(epoch, step), epoch, step)  # the global batch
        g = _GlobalBatch(torch.zeros(len(batch), 4), batch.relation_ids, batch.is_positive, batch.parent_ids,
                         batch.pair_ids)
        totals["sequences"] += len(batch)
        totals["anchors"] += g.n
        totals["anchor_negative_pairs"] += int(g.negatives.sum())
        totals["anchor_positive_pairs"] += int(g.positives.sum())
        totals["own_negative_pairs"] += int(g.own_negatives.sum())
        totals["in_batch_negative_pairs"] += int(g.in_batch_negatives.sum())
        totals["steps"] += 1
    return _per_sequence(totals)


def _per_sequence(t: dict[str, float]) -> dict[str, float]:
    t = dict(t)
    t["negatives_per_anchor"] = t["anchor_negative_pairs"] / max(1, t["anchors"])
    t["negatives_per_sequence"] = t["anchor_negative_pairs"] / max(1, t["sequences"])
    t["sequences_per_step"] = t["sequences"] / max(1, t["steps"])
    return t


def count_public(scheme: Any) -> dict[str, float]:
    """The same counts for one epoch of the public scheme (79 steps, each relation once)."""
    totals = {"sequences": 0, "anchors": 0, "anchor_negative_pairs": 0, "anchor_positive_pairs": 0, "steps": 0}
    for relation in scheme.epoch_order():
        pos, neg = scheme.step_pairs(relation)
        totals["sequences"] += len(pos) + len(neg)
        totals["anchors"] += len(pos)
        totals["anchor_negative_pairs"] += len(pos) * len(neg)
        totals["anchor_positive_pairs"] += len(pos) * len(pos)  # the public loss keeps the diagonal i = j
        totals["steps"] += 1
    return _per_sequence(totals)


# --------------------------------------------------------------------------- main


def flops_per_step(tokens: float, pairs: float, trainer: Any) -> float:
    from relbert_ds.training.monitor import model_flops_per_token

    cfg = trainer.encoder.backbone.config
    return tokens * model_flops_per_token(trainer.setup.matmul_parameters, int(cfg.num_hidden_layers), cfg.hidden_size,
                                          tokens / max(1, pairs))


def arm_stats(name: str, times: list[float], pairs: list[int], tokens: list[int], trainer: Any, peak: float,
              padded_tokens: Optional[list[int]] = None) -> dict[str, Any]:
    total_t = sum(times)
    flops = sum(flops_per_step(t, p, trainer) for t, p in zip(tokens, pairs))
    out = {"arm": name, "steps": len(times), "step_s": common.summary(times),
           "pairs_per_step": sum(pairs) / max(1, len(pairs)), "real_tokens_per_step": sum(tokens) / max(1, len(tokens)),
           "pairs_per_s": sum(pairs) / total_t if total_t else float("nan"),
           "tokens_per_s": sum(tokens) / total_t if total_t else float("nan"),
           "tflops": flops / total_t / 1e12 if total_t else float("nan"),
           "mfu": flops / total_t / peak if total_t and peak else float("nan")}
    if padded_tokens is not None:
        out["padded_tokens_per_step"] = sum(padded_tokens) / max(1, len(padded_tokens))
        out["padded_tokens_per_s"] = sum(padded_tokens) / total_t if total_t else float("nan")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    head = common.header("train_throughput", argv if argv is not None else sys.argv[1:])
    common.setup_single_process(args.threads)
    import torch

    run_dir = tempfile.mkdtemp(prefix="relbert_ds_throughput_")
    t0 = time.perf_counter()
    trainer = build_ours(args, run_dir)
    setup_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    real = None if args.skip_real else start_real(args, Path(run_dir) / "real", threads)
    try:
        return _measure(args, head, trainer, setup_s, threads, run_dir, real)
    finally:
        if real is not None:
            real["arm"].close()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def start_real(args: argparse.Namespace, work_dir: Path, threads: int) -> dict[str, Any]:
    """The real relbert trainer, started and paused before its first step (venv built if needed)."""
    from benchmarks.public_relbert import DEFAULT_VENV, RealArm, relbert_train_shell

    arm = RealArm(args.relbert_venv or DEFAULT_VENV, work_dir, lr=args.lr, threads=threads,
                  num_positive=args.public_positives, num_negative=args.public_negatives,
                  timeout_s=args.real_timeout_s, log=lambda m: print(m, file=sys.stderr, flush=True),
                  model=args.model)
    venv = arm.prepare()
    t = time.perf_counter()
    ready = arm.start()
    return {"arm": arm, "venv": venv, "setup_s": time.perf_counter() - t, "ready": ready,
            "command": relbert_train_shell("<backbone>", "<out>", lr=args.lr, num_positive=args.public_positives,
                                           num_negative=args.public_negatives)}


def _measure(args: argparse.Namespace, head: dict[str, Any], trainer: Any, setup_s: float, threads: int,
             run_dir: str, real: Optional[dict[str, Any]]) -> int:
    """Warm every arm up, run the interleaved repetitions, summarise, print and write the results."""
    from relbert_ds import RelationEncoder
    from relbert_ds.training.sampler import RelationAwareSampler

    peak, peak_source = trainer.setup.peak_flops  # given, or measured once by prepare()
    bare = Bare(args.model, args.lr)
    data = trainer.setup.train_data
    # The public scheme's arms share one model and optimizer (timing only); each has its own plan.
    arms: dict[str, tuple[Any, Any]] = {}
    if not args.no_public:
        scheme = PublicScheme(data, trainer.encoder, args.public_positives, args.public_negatives, padding="max_length")
        public = PublicTrainer(RelationEncoder.from_pretrained(args.model, warn_untrained=False), scheme, lr=args.lr)
        arms["public"] = (public, scheme)
        if not args.no_public_longest:
            arms["public_longest"] = (public, PublicScheme(data, trainer.encoder, args.public_positives,
                                                           args.public_negatives, seed=1, padding="longest"))

    steps_per_epoch = trainer.sampler.steps_per_epoch
    n_ours = steps_per_epoch * args.epochs_per_repeat
    if args.max_steps_per_repeat:
        n_ours = min(n_ours, args.max_steps_per_repeat)

    # Warm-up: one step of every arm (first-touch allocations, lazy initialisation; relbert's first
    # step also builds its negatives lists).
    if real is not None:
        real["arm"].step()
    bare.step(trainer.encoder.tokenize(upcoming_pairs(trainer, 1)[0]))
    ours_step(trainer)
    public_order = {}
    for name, (tr, scheme) in arms.items():
        public_order[name] = scheme.epoch_order()
        _public_step(tr, scheme, public_order[name][0])

    records: dict[str, list[dict]] = {"real": [], "ours": [], "bare": [], "public": [], "public_longest": []}
    reps: list[dict[str, Any]] = []
    names = ["real"] * (real is not None) + ["ours", "bare"] + [n for n in ("public", "public_longest") if n in arms]
    steps_per_epoch_public = len(data.relations)  # one relation per step in the real and re-implemented schemes
    for rep in range(args.repeats):
        # The bare arm replays our next batches: tokenize them before any clock starts.
        bare_tokens = [trainer.encoder.tokenize(pairs) for pairs in upcoming_pairs(trainer, n_ours)]
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: each arm leads once
        rep_record: dict[str, Any] = {"repeat": rep, "order": order, "loadavg_before": common.loadavg()}
        for name in order:
            times = []
            if name == "ours":
                for _ in range(n_ours):
                    start = time.perf_counter()
                    info = ours_step(trainer)
                    times.append(time.perf_counter() - start)
                    records["ours"].append({**info, "seconds": times[-1], "repeat": rep})
            elif name == "real":
                for _ in range(args.real_steps):
                    start = time.perf_counter()
                    info = real["arm"].step()
                    times.append(time.perf_counter() - start)
                    records["real"].append({"pairs": info["sequences"], "real_tokens": info["real_tokens"],
                                            "padded_tokens": info["padded_tokens"], "seconds": times[-1],
                                            "seconds_in_relbert": info["seconds"], "repeat": rep,
                                            "loss": info["loss"], "relbert_step": info["step"]})
            elif name == "bare":
                for tokens in bare_tokens:
                    start = time.perf_counter()
                    bare.step(tokens)
                    times.append(time.perf_counter() - start)
                    records["bare"].append({"pairs": int(tokens["input_ids"].shape[0]),
                                            "real_tokens": int(tokens["attention_mask"].sum()),
                                            "seconds": times[-1], "repeat": rep})
            else:
                tr, scheme = arms[name]
                for k in range(args.public_steps):
                    idx = (1 + rep * args.public_steps + k) % len(public_order[name])
                    relation = public_order[name][idx]
                    pairs = scheme.step_pairs(relation)
                    start = time.perf_counter()
                    info = _public_step(tr, scheme, relation, pairs)
                    times.append(time.perf_counter() - start)
                    records[name].append({"pairs": info["sequences"], "real_tokens": info["real_tokens"],
                                          "padded_tokens": info["padded_tokens"], "seconds": times[-1],
                                          "repeat": rep, "loss": info["loss"]})
            rep_record[f"{name}_s"] = sum(times)
            rep_record[f"{name}_steps"] = len(times)
        rep_record["loadavg_after"] = common.loadavg()
        rep_record["overhead_ratio"] = rep_record["ours_s"] / rep_record["bare_s"]
        ours_epoch = rep_record["ours_s"] / n_ours * steps_per_epoch
        rep_record["ours_epoch_s"] = ours_epoch
        for name in ("real", "public", "public_longest"):
            if name in names:
                pub_epoch = rep_record[f"{name}_s"] / rep_record[f"{name}_steps"] * steps_per_epoch_public
                rep_record[f"{name}_epoch_s_extrapolated"] = pub_epoch
                rep_record[f"epoch_ratio_{name}_over_ours"] = pub_epoch / ours_epoch
        reps.append(rep_record)
        print(f"repeat {rep}: " + ", ".join(f"{k}={v:.3f}" for k, v in rep_record.items()
                                            if isinstance(v, float)), file=sys.stderr, flush=True)

    stats = {}
    for name in names:
        recs = records[name]
        stats[name] = arm_stats(name, [r["seconds"] for r in recs], [r["pairs"] for r in recs],
                                [r["real_tokens"] for r in recs], trainer, peak,
                                [r["padded_tokens"] for r in recs] if name != "ours" and name != "bare" else None)
    overhead = common.summary(r["overhead_ratio"] for r in reps)
    extrapolated = [n for n in ("real", "public", "public_longest") if n in names]
    epoch_ratios = {name: common.summary(r[f"epoch_ratio_{name}_over_ours"] for r in reps) for name in extrapolated}
    ours_epoch = common.summary(r["ours_epoch_s"] for r in reps)
    public_epoch = {name: common.summary(r[f"{name}_epoch_s_extrapolated"] for r in reps) for name in extrapolated}

    # Negatives per encoded sequence, from the masks.
    counts = {"ours": count_ours(trainer.sampler, 0)}
    if "public" in arms:
        counts["public"] = count_public(PublicScheme(data, trainer.encoder, args.public_positives,
                                                     args.public_negatives, seed=0, padding="longest"))
    by_world = []
    for w in args.count_world_sizes:
        if 8 * w > len(data):
            continue
        sampler = RelationAwareSampler(data, world_size=w, rank=0, relations_per_step=8 * w,
                                       positives_per_relation=args.positives_per_relation,
                                       negatives_per_relation=args.negatives_per_relation)
        by_world.append({"world_size": w, "relations_per_rank": 8, **count_ours(sampler, 0)})
    neg_ratio = (counts["ours"]["negatives_per_sequence"] / counts["public"]["negatives_per_sequence"]) \
        if "public" in counts else float("nan")

    document = {**head, "config": {**vars(args), "world_size": 1, "torch_threads": threads,
                                   "precision": trainer.setup.resolved.precision,
                                   "zero_stage": trainer.setup.resolved.zero_stage,
                                   "steps_per_epoch_ours": steps_per_epoch,
                                   "steps_per_epoch_public": arms["public"][1].steps_per_epoch if "public" in arms
                                   else None, "setup_s": setup_s},
                "peak_flops": {"tflops": peak / 1e12, "source": peak_source},
                "arms": stats, "repeats": reps,
                "overhead_ratio": {**overhead, "target": 1.10, "meets_target": overhead["median"] <= 1.10},
                "epoch_seconds": {"ours": ours_epoch, **{f"{k}_extrapolated": v for k, v in public_epoch.items()}},
                "epoch_ratio_over_ours": epoch_ratios,
                "public_epoch_extrapolated_from_steps": args.public_steps * args.repeats,
                "real": None if real is None else
                {"relbert_venv": real["venv"], "setup_s": real["setup_s"], "relbert_train_command": real["command"],
                 "steps_timed": len(records["real"]), "epoch_extrapolated_from_steps": args.real_steps * args.repeats,
                 "step_s_in_relbert": common.summary(r["seconds_in_relbert"] for r in records["real"]),
                 "log": str(real["arm"].work_dir / "relbert.log")},
                "negatives": {**counts, "negatives_per_sequence_ratio_ours_over_public": neg_ratio,
                              "ours_by_world_size": by_world}}

    def cell(s: dict) -> str:
        return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"

    label = {"real": "public relbert 2.0.2 (real relbert-train: 1 relation/step, pad to 64)",
             "ours": "relbert-ds step (DeepSpeed engine, sampler, nce loss)",
             "bare": "bare PyTorch (same tokens, mean-pooled loss, AdamW)",
             "public": "public RelBERT scheme (1 relation/step, pad to 64)",
             "public_longest": "public RelBERT scheme, padding to longest"}
    rows = [[label[n], f"{s['pairs_per_step']:.0f}", f"{s['real_tokens_per_step']:.0f}", cell(s["step_s"]),
             s["pairs_per_s"], s["tokens_per_s"], s["tflops"], 100 * s["mfu"]] for n, s in stats.items()]
    table = common.markdown_table(["arm", "sequences/step", "real tokens/step", "step s median [min-max]",
                                   "sequences/s", "real tokens/s", "TFLOP/s", "MFU %"], rows, digits=3)
    ratio_rows = [["overhead: ours / bare, time for the same token batches (target <= 1.10)", cell(overhead)]]
    for name, s in epoch_ratios.items():
        steps = args.real_steps if name == "real" else args.public_steps
        ratio_rows.append([f"epoch over SemEval-2012: {label[name]} / ours "
                           f"({public_epoch[name]['median']:.0f} s vs {ours_epoch['median']:.0f} s; "
                           f"extrapolated from {steps} steps x {args.repeats})", cell(s)])
    if "public" in counts:
        c, p = counts["ours"], counts["public"]
        ratio_rows.append([f"negatives per encoded sequence: ours {c['negatives_per_sequence']:.1f} "
                           f"({c['negatives_per_anchor']:.0f} per anchor, "
                           f"{c['sequences_per_step']:.0f} sequences/step) "
                           f"vs public {p['negatives_per_sequence']:.2f} ({p['negatives_per_anchor']:.0f} per anchor, "
                           f"{p['sequences_per_step']:.0f} sequences/step)", f"{neg_ratio:.2f}"])
    table += "\n" + common.markdown_table(["ratio", "value (median [min-max] over repetitions)"], ratio_rows)
    if by_world:
        table += "\n" + common.markdown_table(
            ["ranks x 8 relations", "sequences/step", "negatives/anchor", "negatives per encoded sequence"],
            [[w["world_size"], w["sequences_per_step"], w["negatives_per_anchor"], w["negatives_per_sequence"]]
             for w in by_world], digits=1)
    table += (f"\nWorld size 1, {threads} torch threads, {trainer.setup.resolved.precision}, "
              f"ZeRO-{trainer.setup.resolved.zero_stage}; "
              f"MFU against {peak / 1e12:.3f} TFLOP/s ({peak_source}); FLOPs = 6 x matmul params x real tokens + "
              f"attention (padding not counted); load average {head['loadavg_start']} -> {common.loadavg()}.\n")
    if real is not None:
        table += (f"The real arm ran in its own process with {threads} torch threads, paused while the others ran; "
                  f"its venv was {'built by this run' if real['venv']['built_now'] else 'already there'} "
                  f"(build: {real['venv']['created_s'] / 60:.1f} min).\n")
    common.emit(table, Path(args.output or common.default_output("train_throughput")), document)
    return 0


def _public_step(trainer: Any, scheme: Any, relation: str, pairs: Any = None) -> dict[str, Any]:
    """One public-scheme step whose tokens come from ``scheme`` (its padding) on the shared model."""
    trainer.scheme = scheme
    return trainer.step(relation, pairs or scheme.step_pairs(relation))


if __name__ == "__main__":
    sys.exit(main())
