"""What a ``--model`` / ``--baseline`` spec names, checked without reading weights: a Hugging Face folder,
hub id or backbone name (an export of the trainer included), or one of the trainer's DeepSpeed checkpoints
(``<run>/checkpoints`` = its latest, or a ``global_step<N>`` folder, any ZeRO stage). A run folder is
refused (it holds several models). The evaluator's command line resolves both models through it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from relbert_ds.errors import ModelError
from relbert_ds.model import backbones
from relbert_ds.model.encoder import RelationEncoder, read_relbert_config
from relbert_ds.model.prompts import resolve_template
from relbert_ds.parallel import distributed
from relbert_ds.training import checkpointing
from relbert_ds.training.run_directory import RunDirectory


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec checked cheaply (no weights read yet); ``load()`` does the heavy part."""

    spec: str
    resolved: str  # local folder, hub id, or a checkpoint's tag folder
    kind: str  # "huggingface" (folder, hub id or backbone name) or "deepspeed_checkpoint"
    template: Optional[str] = None
    pooling: Optional[str] = None
    max_length: Optional[int] = None
    trained: bool = False  # carries a relbert_config (a trained RelBERT model or a checkpoint)

    def load(self, device: Any = None) -> Any:
        if self.kind == "deepspeed_checkpoint":
            encoder = checkpointing.encoder_from_checkpoint(Path(self.resolved), template=self.template,
                                                            pooling=self.pooling)
        else:
            # an untrained backbone is said once (rank 0), not once per rank
            encoder = RelationEncoder.from_pretrained(self.resolved, template=self.template, pooling=self.pooling,
                                                      max_length=self.max_length, warn_untrained=distributed.is_main())
        encoder.name = self.spec  # the name the user gave (the results name the model by it)
        return encoder.to(device) if device is not None else encoder


def resolve_model(spec: str, template: Optional[str] = None, pooling: Optional[str] = None,
                  max_length: Optional[int] = None, override_prompt: bool = False) -> ResolvedModel:
    """Check a ``--model``/``--baseline`` spec without loading weights.

    Branches: a trainer's run folder (refused: it holds several models, the user picks one); a
    DeepSpeed checkpoint folder of the trainer (``<run>/checkpoints`` = its latest tag, or one
    ``global_step<N>`` folder; any ZeRO stage); otherwise a Hugging Face folder, hub id or
    backbone name. A trained RelBERT model (or checkpoint) is evaluated with the prompt it was
    trained with: an explicit different ``template``/``pooling`` is refused unless
    ``override_prompt`` (an ablation), since the result would silently describe another model.
    """
    path = Path(spec).expanduser()
    run = RunDirectory(path)
    if run.is_run_directory():
        raise ModelError(f"{spec} is a relbert-ds training run, which holds several models; fix: pass "
                         f"{run.best_model} (the epoch chosen on validation), {run.model} (the last "
                         f"epoch) or {run.checkpoints} (its latest checkpoint)")
    if run.looks_like_checkpoint() and not (path / "config.json").is_file():
        tag_dir = checkpointing.resolve_tag_dir(path)
        meta = checkpointing.read_meta(tag_dir)
        if override_prompt:
            raise ModelError(f"--override_prompt does not apply to the checkpoint {spec}: its weights are read "
                             f"into the backbone it names with the prompt it was trained with; fix: export it "
                             f"first (or drop --override_prompt)")
        # Checked now, before any weights are read, so that every rank agrees on the error.
        checkpointing.check_prompt(meta, tag_dir, template, pooling)
        backbones.check_model_exists(meta["model"])
        return ResolvedModel(spec=spec, resolved=str(tag_dir), kind="deepspeed_checkpoint", trained=True)
    resolved = backbones.check_model_exists(spec)
    saved = read_relbert_config(backbones.load_config(resolved, False))
    if saved and not override_prompt:
        if template is not None and saved.get("template") and resolve_template(template) != saved["template"]:
            raise ModelError(f"{spec} is a RelBERT model trained with template {saved['template']!r}, not "
                             f"{resolve_template(template)!r}; fix: drop --template (the saved one is used), or "
                             f"pass --override_prompt to evaluate it with another prompt on purpose")
        if pooling is not None and saved.get("aggregation_mode") and pooling != saved["aggregation_mode"]:
            raise ModelError(f"{spec} is a RelBERT model trained with pooling {saved['aggregation_mode']!r}, not "
                             f"{pooling!r}; fix: drop --pooling (the saved one is used), or pass --override_prompt "
                             f"to evaluate it with another pooling on purpose")
    return ResolvedModel(spec=spec, resolved=resolved, kind="huggingface", template=template, pooling=pooling,
                         max_length=max_length, trained=bool(saved))


def zero_shot_like(baseline: ResolvedModel, encoder: Any) -> ResolvedModel:
    """An untrained baseline with the evaluated model's prompt, pooling and length where it names none
    (the zero-shot comparison); a trained baseline keeps its own."""
    if baseline.trained:
        return baseline
    return replace(baseline, template=baseline.template or encoder.template,
                   pooling=baseline.pooling or encoder.pooling, max_length=baseline.max_length or encoder.max_length)
