"""What an evaluation reports: the flat metrics, the side-by-side markdown table, TensorBoard scalars,
and the results JSON (rank 0 writes; :func:`write_outputs`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from relbert_ds.model.prompts import template_id
from relbert_ds.parallel.collectives import world_info


def _finite(x: Any) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


ANALOGY_METRICS = ("accuracy",)
CLASSIFICATION_METRICS = ("f1_macro", "f1_micro", "accuracy")
MAPPING_METRICS = ("accuracy",)


def flat_metrics(result: dict) -> dict[str, float]:
    """``{"analogy/sat/test/accuracy": 0.5, ...}``: the scalar metrics (for TensorBoard, selection)."""
    out: dict[str, float] = {}
    for key, entry in result["analogy"].items():
        out[f"analogy/{key}/accuracy"] = entry["accuracy"]
        out[f"analogy/{key}/n_tied"] = float(entry["n_tied"])
    for key, entry in result["classification"].items():
        for metric in CLASSIFICATION_METRICS:
            out[f"classification/{key}/{metric}"] = entry[metric]
    for key, entry in result["mapping"].items():
        out[f"mapping/{key}/accuracy"] = entry["accuracy"]
    return out


def strip_predictions(result: dict) -> tuple[dict, list[dict]]:
    """A copy of ``result`` without per-item predictions, and those predictions as records."""
    records: list[dict] = []
    clean = {k: v for k, v in result.items() if k != "vectors"}
    for task in ("analogy", "classification", "mapping"):
        clean[task] = {}
        for key, entry in result.get(task, {}).items():
            entry = dict(entry)
            for item in entry.pop("predictions", []):
                records.append({"task": task, "dataset": entry["dataset"], "split": entry["split"], **item})
            clean[task][key] = entry
    return clean, records


def _rows(results: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    """(task, dataset, split, metric, n) of every measured number, in a stable order (what was not
    measured is listed under the table, not as rows of n/a)."""
    rows: list[tuple[str, str, str, str, str]] = []
    seen = set()
    for res in results.values():
        items = [("analogy", e["dataset"], e["split"], m, str(e["n_questions"]))
                 for e in res["analogy"].values() for m in ANALOGY_METRICS]
        items += [("classification", e["dataset"], e["split"], m, str(e["n_eval"]))
                  for e in res["classification"].values() for m in CLASSIFICATION_METRICS]
        items += [("mapping", e["dataset"], e["split"], m, str(e["n_problems"]))
                  for e in res["mapping"].values() for m in MAPPING_METRICS]
        for row in items:
            if row[:4] not in seen:
                seen.add(row[:4])
                rows.append(row)
    order = {"analogy": 0, "classification": 1, "mapping": 2}
    split_order = {"validation": 0, "test": 1, "full": 2}
    return sorted(rows, key=lambda r: (order[r[0]], r[1].lower(), split_order.get(r[2], 3), r[3]))


def _cell(res: dict, task: str, dataset: str, split: str, metric: str) -> str:
    key = dataset if task == "mapping" else f"{dataset}/{split}"
    entry = res[task].get(key)
    if entry is None:
        for m in res["missing"]:
            if (m["task"], m["dataset"], m["split"]) == (task, dataset, split):
                return f"n/a ({m['reason']})"
        return "-"
    value = entry[metric]
    text = f"{100 * value:.1f}"
    if task == "analogy" and entry.get("n_tied"):
        text += f" ({entry['n_tied']} tied)"
    if task == "classification" and entry.get("default_reason") == "no validation split":
        text += " (default grid point: no validation split)"
    return text


def _probe_note(results: dict[str, dict]) -> str:
    """The footer line naming the classification probe and features of each model ('' without classification)."""
    notes = []
    for label, res in results.items():
        probe = res.get("probe")
        if probe and res.get("classification"):
            pooled = "summed (relbert's)" if probe["features"] == "sum" else "mean"
            protocol = probe.get("protocol", "paper")
            how = ("fast protocol: grid cut by successive halving on validation macro F1" if protocol == "fast"
                   else "paper protocol")
            notes.append(f"{label} = {probe['implementation']} probe on {probe['device']} ({how}), features "
                         f"concat(emb(h,t), emb(t,h)) of {pooled} pooled vectors")
    if not notes:
        return ""
    return ("Classification: " + "; ".join(notes) + "; grid hidden {100,150,200} x lr {1e-3,1e-4,1e-5} selected on "
            "validation macro F1 (without a validation split: the default grid point hidden 100, lr 1e-3).\n")


def markdown_table(results: dict[str, dict]) -> str:
    """A markdown table of the metrics (in %), one column per evaluated model (side by side)."""
    labels = list(results)
    header = "| task | dataset | split | metric | n | " + " | ".join(labels) + " |"
    lines = [header, "|" + "---|" * (5 + len(labels))]
    for task, dataset, split, metric, n in _rows(results):
        cells = [_cell(results[label], task, dataset, split, metric) for label in labels]
        lines.append(f"| {task} | {dataset} | {split} | {metric} | {n} | " + " | ".join(cells) + " |")
    identities = {label: r["model"] for label, r in results.items()}
    models = "; ".join(f"{label} = {m.get('name')} (template {_template_name(m.get('template'))}, "
                       f"pooling {m.get('pooling')})" for label, m in identities.items())
    return "\n".join(lines) + f"\n\nModels: {models}\n" + _missing_note(results) + _probe_note(results)


def _template_name(template: Optional[str]) -> str:
    return template_id(template) or repr(template)


def _missing_note(results: dict[str, dict]) -> str:
    """One line naming the requested dataset/split pairs that could not be measured, and why."""
    missing = {(m["dataset"], m["split"]): m["reason"] for res in results.values() for m in res.get("missing", [])}
    if not missing:
        return ""
    by_reason: dict[str, list[str]] = {}
    for (dataset, split), reason in missing.items():
        by_reason.setdefault(reason, []).append(f"{dataset} {split}")
    return "Not measured: " + "; ".join(f"{', '.join(sorted(names))} ({reason})"
                                         for reason, names in by_reason.items()) + "\n"


def write_tensorboard(results: dict[str, dict], log_dir: Union[str, Path], step: int = 0,
                      writer: Any = None) -> None:
    """Write every flat metric as ``<label>/<task>/<dataset>/<split>/<metric>`` (rank 0 only)."""
    rank, _ = world_info()
    if rank != 0:
        return
    own = writer is None
    if own:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for label, res in results.items():
            for key, value in res["metrics"].items():
                if _finite(value) is not None:
                    writer.add_scalar(f"{label}/{key}", value, global_step=step)
        writer.flush()
    finally:
        if own:
            writer.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _jsonable(obj: Any) -> Any:
    """NaN -> None (strict JSON), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_outputs(results: dict[str, dict], header: dict, output: Optional[Union[str, Path]] = None,
                  predictions: Optional[Union[str, Path]] = None, tensorboard_dir: Optional[Union[str, Path]] = None,
                  step: int = 0) -> dict:
    """Rank 0: results JSON (``header`` + one entry per model), predictions JSONL, TensorBoard.

    Returns the JSON document. Other ranks write nothing and get it back too.
    """
    rank, _ = world_info()
    clean: dict[str, dict] = {}
    records: list[dict] = []
    for label, res in results.items():
        clean[label], recs = strip_predictions(res)
        records += [{"model": label, **r} for r in recs]
    document = _jsonable({**header, "models": clean})
    if rank != 0:
        return document
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n", encoding="utf-8")
    if predictions:
        path = Path(predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(_jsonable(rec), default=_json_default) + "\n")
    if tensorboard_dir:
        write_tensorboard(results, tensorboard_dir, step=step)
    return document
