"""The README.md written into every exported model folder: recipe, validation, how to load."""
from __future__ import annotations

import json
from typing import Any, Optional

from relbert_ds import __version__


def model_card(run: Any, resolved: Any, world_size: int, results: Optional[dict], best: Optional[dict],
               template: str) -> str:
    m, d, t = run.model, run.data, run.train
    opt = resolved.config.get("optimizer", {})
    sched = resolved.config.get("scheduler", {})
    lines = [
        "---", "library_name: transformers", "tags: [relbert, relation-embedding, relbert-ds]", "---", "",
        f"# RelBERT relation encoder fine-tuned from `{m.model}`", "",
        "Trained with [relbert-ds](https://github.com/) "
        f"{__version__}: a word pair (head, tail) is put into the prompt below, encoded by the backbone and "
        f"pooled ({m.pooling}) into one vector describing the relation.", "",
        "## Use", "", "```python", "from relbert_ds import RelationEncoder",
        "encoder = RelationEncoder.from_pretrained('<this folder>')",
        "vectors = encoder.encode([('paris', 'france'), ('tokyo', 'japan')])", "```", "",
        "The folder is a standard Hugging Face model (`transformers.AutoModel.from_pretrained` loads it); "
        "`config.json` carries the prompt and pooling under `relbert_config` (relbert v2 keys).", "",
        "## Recipe", "",
        f"- template: `{template}`", f"- pooling: {m.pooling}, max length {m.max_length}",
        f"- data: {d.train_data} ({d.train_split}); per rank and step {resolved.micro_batch} relations x "
        f"{d.positives_per_relation} positives + up to {d.negatives_per_relation} negatives; cross-device negatives "
        f"over {world_size} rank(s)",
        f"- loss: {t.loss}" + (f" (temperature {t.temperature})" if t.loss != "triplet" else f" (margin {t.margin})")
        + (" + classification loss" if t.classification_loss else ""),
        f"- optimizer: {json.dumps(opt)}", f"- schedule: {json.dumps(sched)}",
        f"- epochs: {t.epochs}, precision {resolved.precision}, ZeRO stage {resolved.zero_stage}, seed {d.seed}", "",
    ]
    if results:
        lines += ["## Validation", "", f"Epoch {results.get('epoch')} (best epoch: {best.get('epoch') if best else None},"
                  f" selected by {run.validation.metric}).", "", "| set | accuracy |", "|---|---|"]
        for name, acc in results.get("analogy", {}).items():
            lines.append(f"| {name} (valid) | {100 * acc:.1f} |")
        if "loss" in results:
            lines.append(f"| validation loss | {results['loss']:.4f} |")
        lines.append("")
    return "\n".join(lines)
