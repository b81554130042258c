"""The model card (README.md) of an exported model: hub metadata, how to load it, results, recipe, citation.

Two ways in, one card:

- :func:`model_card` - what the trainer's export writes into every model folder, from the live
  run (``run``, the resolved DeepSpeed config, the world size, the epoch's validation results);
- :func:`card_from_folder` - what ``relbert-ds-push`` uploads, from an exported folder's
  ``relbert_ds_training.json`` (the same facts, written by the export) and, when given, the
  results JSON of ``relbert-ds-evaluate --output`` (its metrics become the ``model-index``).

Both build the same ``training`` record (run config + ``deepspeed`` + ``world_size`` +
``validation`` + ``best``) and hand it to :func:`build_card`. The YAML front matter follows the
Hugging Face model card metadata spec (``model-index`` entries: task, dataset, metrics).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from relbert_ds import __version__
from relbert_ds.errors import UserError
from relbert_ds.model.prompts import template_id

TRAINING_FILE = "relbert_ds_training.json"  # written by Trainer.export
DEFAULT_LICENSE = "apache-2.0"  # relbert-ds's own and the bundled backbone's licence

# Hub ids of what relbert-ds bundles (the bundled copies are the same data and weights).
_BUNDLED_BACKBONES = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                      "sentence-transformers/all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                      "bundled": "sentence-transformers/all-MiniLM-L6-v2"}
_BUNDLED_RELATION_DATA = {"semeval2012": "relbert/semeval2012_relational_similarity"}
_TASKS = {  # results JSON task -> (model-index task type, task name, hub dataset of the bundled sets, metrics)
    "analogy": ("analogy-questions", "Analogy questions", "relbert/analogy_questions", ("accuracy",)),
    "classification": ("lexical-relation-classification", "Lexical relation classification",
                       "relbert/lexical_relation_classification", ("f1_macro", "f1_micro", "accuracy")),
    "mapping": ("relation-mapping", "Relation mapping", "relbert/relation_mapping", ("accuracy",)),
}
_BUNDLED_EVAL_SETS = {"analogy": {"sat", "u2", "u4", "google", "bats"}, "classification": {"BLESS", "KHN"},
                      "mapping": set()}
_METRIC_NAMES = {"accuracy": "Accuracy", "f1_macro": "F1 (macro)", "f1_micro": "F1 (micro)", "loss": "Loss"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

CITATION = """\
@inproceedings{ushio-etal-2021-distilling,
    title = "Distilling Relation Embeddings from Pre-trained Language Models",
    author = "Ushio, Asahi and Camacho-Collados, Jose and Schockaert, Steven",
    booktitle = "Proceedings of the 2021 Conference on Empirical Methods in Natural Language Processing",
    year = "2021",
    pages = "9044--9062",
    publisher = "Association for Computational Linguistics",
}

@article{ushio-etal-2023-relbert,
    title = "{RelBERT}: Embedding Relations with Language Models",
    author = "Ushio, Asahi and Camacho-Collados, Jose and Schockaert, Steven",
    journal = "Artificial Intelligence",
    volume = "347",
    year = "2025",
    note = "arXiv:2310.00299",
}"""


class CardError(UserError):
    """An exported folder or results file the card cannot be built from."""


# --------------------------------------------------------------------------- entry points


def card_from_folder(folder: Union[str, Path], results: Optional[Union[str, Path, dict]] = None,
                     repo_id: Optional[str] = None, license: str = DEFAULT_LICENSE) -> str:
    """The full card of an exported folder (read only), with the evaluator's results when given.

    ``results`` is the path of a ``relbert-ds-evaluate --output`` file (or its parsed document).
    """
    folder = Path(folder)
    training = read_training_record(folder)
    template = _saved_template(folder)
    if not template:
        from relbert_ds.model.prompts import resolve_template

        template = resolve_template(training["model"].get("template") or "d")
    evaluation = load_results(results) if isinstance(results, (str, Path)) else results
    files = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return build_card(training, template=template, evaluation=evaluation, repo_id=repo_id, license=license,
                      files=files)


def read_training_record(folder: Path) -> dict:
    """``relbert_ds_training.json`` of an export; CardError when the folder is not an export."""
    path = folder / TRAINING_FILE
    if not folder.is_dir() or not (folder / "config.json").is_file() or not path.is_file():
        raise CardError(f"{folder} is not a model exported by relbert-ds (it needs config.json and {TRAINING_FILE}); "
                        f"fix: pass <run>/best_model or <run>/model of a finished training run")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"{path} cannot be read as JSON ({exc}); fix: export the model again") from exc
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise CardError(f"{path} lacks the run's model section; fix: export the model again with relbert-ds")
    return record


def _saved_template(folder: Path) -> Optional[str]:
    """The prompt text the export's ``config.json`` carries under ``relbert_config``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    saved = config.get("relbert_config") if isinstance(config, dict) else None
    return saved.get("template") if isinstance(saved, dict) else None


def load_results(path: Union[str, Path]) -> dict:
    """A ``relbert-ds-evaluate --output`` document; CardError when it is something else."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"cannot read the results file {path} ({exc}); fix: pass the JSON written by "
                        f"relbert-ds-evaluate --output") from exc
    model = document.get("models", {}).get("model") if isinstance(document, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("metrics"), dict):
        raise CardError(f"{path} is not a relbert-ds-evaluate results file (no models.model.metrics); fix: pass "
                        f"the JSON written by relbert-ds-evaluate --output")
    return document


# --------------------------------------------------------------------------- metadata


def base_model_id(name: str) -> Optional[str]:
    """The hub id of a backbone name, or None for a local folder (the hub cannot link to it)."""
    if name.lower() in _BUNDLED_BACKBONES:
        return _BUNDLED_BACKBONES[name.lower()]
    if os.path.exists(os.path.expanduser(name)) or not _HUB_ID.match(name):
        return None
    return name


def training_dataset_id(name: str) -> Optional[str]:
    """The hub id of the training data, or None for a local file."""
    if name in _BUNDLED_RELATION_DATA:
        return _BUNDLED_RELATION_DATA[name]
    hub_id = name.split(":", 1)[0]
    if os.path.exists(os.path.expanduser(hub_id)) or not _HUB_ID.match(hub_id) or "/" not in hub_id:
        return None
    return hub_id


def evaluation_entries(evaluation: dict) -> list[dict]:
    """One record per reported number of the evaluated model: task, dataset, split, metric, value, n.

    Taken from the structured results (``models.model.<task>``), the numbers the evaluator's
    table prints; a metric that is null (NaN in the run) is left out.
    """
    model = evaluation["models"]["model"]
    out = []
    for task, (_, _, _, metrics) in _TASKS.items():
        for key, entry in (model.get(task) or {}).items():
            n = entry.get("n_questions", entry.get("n_eval", entry.get("n_problems")))
            for metric in metrics:
                value = entry.get(metric)
                if isinstance(value, (int, float)):
                    out.append({"task": task, "dataset": entry.get("dataset", key), "split": entry.get("split", "all"),
                                "metric": metric, "value": float(value), "n": n})
    return out


def validation_entries(validation: Optional[dict]) -> list[dict]:
    """The trainer's per-epoch validation (analogy accuracies, loss) in the same record form."""
    if not validation:
        return []
    out = [{"task": "analogy", "dataset": name, "split": "validation", "metric": "accuracy", "value": float(acc),
            "n": None} for name, acc in (validation.get("analogy") or {}).items()]
    if isinstance(validation.get("loss"), (int, float)):
        out.append({"task": "relation-loss", "dataset": "validation relations", "split": "validation",
                    "metric": "loss", "value": float(validation["loss"]), "n": None})
    return out


def _dataset_type(task: str, dataset: str) -> str:
    if dataset in _BUNDLED_RELATION_DATA:
        return _BUNDLED_RELATION_DATA[dataset]
    if dataset in _BUNDLED_EVAL_SETS.get(task, ()):
        return _TASKS[task][2]
    return dataset


def model_index(name: str, entries: list[dict]) -> list[dict]:
    """``model-index`` in the hub's schema: one result per (task, dataset, split), its metrics inside."""
    results: dict[tuple, dict] = {}
    for e in entries:
        task_type, task_name = (_TASKS[e["task"]][:2] if e["task"] in _TASKS else (e["task"], e["task"]))
        key = (e["task"], e["dataset"], e["split"])
        if key not in results:
            results[key] = {"task": {"type": task_type, "name": task_name},
                            "dataset": {"type": _dataset_type(e["task"], e["dataset"]), "name": e["dataset"],
                                        "config": e["dataset"], "split": e["split"]},
                            "metrics": []}
        results[key]["metrics"].append({"type": e["metric"], "value": e["value"],
                                        "name": f"{_METRIC_NAMES.get(e['metric'], e['metric'])} ({e['split']})"})
    return [{"name": name, "results": list(results.values())}]


def metadata(training: dict, entries: list[dict], name: str, license: str = DEFAULT_LICENSE) -> dict:
    """The YAML front matter."""
    meta: dict[str, Any] = {"library_name": "transformers", "license": license}
    base = base_model_id(training["model"].get("model", ""))
    if base:
        meta["base_model"] = base
    sources = training.get("data", {}).get("train_data") or []
    sources = [sources] if isinstance(sources, str) else sources  # one source before relbert-ds 0.2
    datasets = [d for d in dict.fromkeys(training_dataset_id(str(s)) for s in sources) if d]
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "feature-extraction"
    meta["tags"] = ["relbert", "relbert-ds", "relation-embedding", "word-pair", "deepspeed"]
    if entries:
        meta["model-index"] = model_index(name, entries)
    return meta


# --------------------------------------------------------------------------- the card


def build_card(training: dict, template: str, evaluation: Optional[dict] = None, repo_id: Optional[str] = None,
               license: str = DEFAULT_LICENSE, files: Optional[list[str]] = None) -> str:
    """The README.md text: front matter, summary, usage, results, recipe, citation."""
    m = training.get("model", {})
    backbone = m.get("model", "?")
    name = repo_id.split("/")[-1] if repo_id else f"relbert-ds-{Path(str(backbone)).name}"
    entries = evaluation_entries(evaluation) if evaluation \
        else validation_entries(training.get("validation_results"))
    front = yaml.safe_dump(metadata(training, entries, name, license), sort_keys=False, allow_unicode=True)
    where = repo_id or "path/to/this/folder"
    lines = ["---", front.rstrip("\n"), "---", "",
             f"# {name}", "",
             f"A [RelBERT](https://arxiv.org/abs/2310.00299) relation encoder fine-tuned from `{backbone}` with "
             f"relbert-ds {training.get('relbert_ds_version', __version__)}: a word pair (head, tail) is put into a "
             f"prompt, encoded by the backbone and pooled ({m.get('pooling')}) into one vector that describes the "
             "relation between the two words. Pairs with similar relations (paris-france, tokyo-japan) get "
             "vectors with a high cosine similarity.", ""]
    lines += _usage(where, files)
    lines += _results(evaluation, entries, training)
    lines += _recipe(training, template)
    lines += ["## Citation", "", "The method is RelBERT's; please cite:", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _usage(where: str, files: Optional[list[str]]) -> list[str]:
    lines = ["## Use", "", "With relbert-ds (`pip install relbert-ds`):", "", "```python",
             "from relbert_ds import RelationEncoder", "",
             f"encoder = RelationEncoder.from_pretrained({where!r})",
             "vectors = encoder.encode([('paris', 'france'), ('tokyo', 'japan')])  # (2, hidden) relation vectors",
             "```", "",
             "With the public relbert package (`pip install relbert`):", "", "```python",
             "from relbert import RelBERT", "",
             f"model = RelBERT({where!r})",
             "vectors = model.get_embedding([['paris', 'france'], ['tokyo', 'japan']])", "```", ""]
    if files is not None and "pytorch_model.bin" not in files:
        lines += ["relbert 2.0.2 reads only `pytorch_model.bin`; this folder holds `model.safetensors`, so load it "
                  "with relbert-ds or `transformers`, or convert the weights first.", ""]
    else:
        lines += ["relbert 2.0.2 reads the weights from `pytorch_model.bin` (relbert-ds exports can carry it next "
                  "to `model.safetensors`).", ""]
    lines += ["The folder is a standard Hugging Face model: `transformers.AutoModel.from_pretrained` loads the "
              "backbone, and `config.json` carries the prompt and pooling under `relbert_config` (relbert v2 keys).",
              ""]
    return lines


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def _results(evaluation: Optional[dict], entries: list[dict], training: dict) -> list[str]:
    lines = ["## Results", ""]
    if evaluation:
        models = evaluation.get("models", {})
        baseline = models.get("baseline")
        base_name = (baseline or {}).get("model", {}).get("name", "baseline")
        lines += [f"From `relbert-ds-evaluate` ({evaluation.get('created_utc', 'date unknown')}, "
                  f"{evaluation.get('world_size', '?')} rank(s)); accuracy and F1 in %, n = questions, test "
                  "pairs or problems."
                  + (f" Baseline: `{base_name}` (the evaluator's --baseline, same call)." if baseline else ""),
                  "", "| task | dataset | split | metric | n | this model |" + (" baseline |" if baseline else ""),
                  "|---|---|---|---|---|---|" + ("---|" if baseline else "")]
        for e in entries:
            n = e["n"] if e["n"] is not None else "-"
            row = f"| {e['task']} | {e['dataset']} | {e['split']} | {e['metric']} | {n} | {_pct(e['value'])} |"
            if baseline:
                section = baseline.get(e["task"], {})
                key = e["dataset"] if e["task"] == "mapping" else f"{e['dataset']}/{e['split']}"
                row += f" {_pct(section.get(key, {}).get(e['metric']))} |"
            lines.append(row)
        missing = models.get("model", {}).get("missing") or []
        if missing:
            lines += ["", "Not measured: " + "; ".join(f"{x.get('dataset')} {x.get('split')} ({x.get('reason')})"
                                                       for x in missing) + "."]
        lines.append("")
        return lines
    validation = training.get("validation_results")
    if not entries:
        return lines + ["No evaluation is attached to this export; `relbert-ds-evaluate --model <this folder> "
                        "--output results.json` measures it, and `relbert-ds-push --results results.json` "
                        "publishes the numbers with the model.", ""]
    best = training.get("best") or {}
    lines += [f"Validation during training, epoch {validation.get('epoch')} after optimizer step "
              f"{validation.get('optimizer_step')} (best epoch: {best.get('epoch')}, selected by "
              f"{best.get('metric') or 'the last epoch'}).", "",
              "| set | split | metric | value |", "|---|---|---|---|"]
    for e in entries:
        value = f"{e['value']:.4f}" if e["metric"] == "loss" else _pct(e["value"])
        lines.append(f"| {e['dataset']} | {e['split']} | {e['metric']} | {value} |")
    return lines + [""]


def _template_cell(template: str) -> str:
    key = template_id(template)
    return f"{key} (`{template}`)" if key else f"`{template}`"


def _recipe(training: dict, template: str) -> list[str]:
    m, d, t = training.get("model", {}), training.get("data", {}), training.get("train", {})
    ds = training.get("deepspeed") or {}
    world = training.get("world_size", 1)
    accum = ds.get("gradient_accumulation_steps", 1)
    global_batch = training.get("relations_per_step") or ds.get("train_batch_size")  # the export records it
    validation = training.get("validation_results") or {}
    positives, negatives = d.get("positives_per_relation"), d.get("negatives_per_relation")
    loss = t.get("loss")
    loss_text = f"triplet (margin {t.get('margin')})" if loss == "triplet" else \
        f"{loss} (temperature {t.get('temperature')})"
    if t.get("classification_loss"):
        loss_text += " + classification loss"
    zero = (ds.get("zero_optimization") or {}).get("stage", 0)
    precision = training.get("precision") or ("bf16" if (ds.get("bf16") or {}).get("enabled") is True else
                                              "fp16" if (ds.get("fp16") or {}).get("enabled") is True else "fp32")
    if precision != "fp32":
        precision += " training, weights saved in fp32 (the optimizer's master copy)"
    steps = training.get("optimizer_steps", validation.get("optimizer_step"))
    plan = ", ".join(x for x in (f"{t['epochs']} epoch(s)" if t.get("epochs") else "",
                                 f"max_steps {t['max_steps']}" if t.get("max_steps") else "") if x)
    lines = ["## Training recipe", "",
             "| | |", "|---|---|",
             f"| backbone | `{m.get('model')}` |",
             f"| template | {_template_cell(template)} |",
             f"| pooling | {m.get('pooling')}, max length {m.get('max_length')} tokens |",
             f"| data | {_sources(d)} ({d.get('train_split')} split) |",
             f"| global batch | {global_batch} relation groups per optimizer step over {world} rank(s), {accum} "
             f"micro step(s) each; each group {positives} positive pairs + up to {negatives} of its own negative "
             f"pairs, every other group's pairs are negatives too (cross-device) |",
             f"| steps | {steps if steps is not None else '?'} optimizer steps at export"
             + (f" (planned: {plan})" if plan else "") + " |",
             f"| loss | {loss_text} |",
             f"| optimizer | {_json_inline(ds.get('optimizer')) or '?'} |",
             f"| schedule | {_json_inline(ds.get('scheduler')) or training.get('schedule') or '?'} |",
             f"| precision, ZeRO | {precision}, ZeRO stage {zero} |",
             f"| seed | {d.get('seed')} |", "",
             "The DeepSpeed config the run used (as resolved by relbert-ds):", "", "```json",
             json.dumps(ds, indent=2, sort_keys=True), "```", ""]
    return lines


def _sources(d: dict) -> str:
    sources = d.get("train_data")
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    weights = d.get("train_weights")
    if weights and len(weights) == len(sources):
        return ", ".join(f"{s} (weight {w})" for s, w in zip(sources, weights))
    return ", ".join(map(str, sources)) or "?"


def _json_inline(value: Any) -> str:
    return f"`{json.dumps(value, sort_keys=True)}`" if value else ""
