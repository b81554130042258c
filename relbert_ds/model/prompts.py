"""Prompt templates: the paper's five manual templates and validation of user templates.

This is the one place that turns a word pair into prompt text.
"""
from __future__ import annotations

import re
from typing import Optional

from relbert_ds.errors import ConfigError, ModelError

SUBJ, OBJ, MASK = "<subj>", "<obj>", "<mask>"

# Verbatim from RelBERT (EMNLP 2021, Table 1; public relbert code). b and e have two spaces
# before "is"; d and e use the typographic apostrophe U+2019. Do not "fix" them: trained
# models are sensitive to the exact tokens they were trained with.
TEMPLATES: dict[str, str] = {
    "a": "Today, I finally discovered the relation between <subj> and <obj> : <subj> is the <mask> of <obj>",
    "b": "Today, I finally discovered the relation between <subj> and <obj> : <obj>  is <subj>'s <mask>",
    "c": "Today, I finally discovered the relation between <subj> and <obj> : <mask>",
    "d": "I wasn\u2019t aware of this relationship, but I just read in the encyclopedia that <subj> is the <mask> of <obj>",  # noqa: E501
    "e": "I wasn\u2019t aware of this relationship, but I just read in the encyclopedia that <obj>  is <subj>\u2019s <mask>",  # noqa: E501
}
DEFAULT_TEMPLATE = "d"

_SLOT = re.compile(r"<subj>|<obj>|<mask>")


def template_id(template: Optional[str]) -> Optional[str]:
    """``"d"`` when ``template`` is the text of the paper's template d (a-e); None for any other."""
    return next((key for key, text in TEMPLATES.items() if text == template), None)


def resolve_template(template: str) -> str:
    """Return the template text for an id ``a``-``e`` or validate and return a user template."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    missing = [slot for slot in (SUBJ, OBJ) if slot not in template]
    if missing:
        raise ConfigError(
            f"template {template!r} has no {' and no '.join(missing)} slot; "
            f"fix: use one of the ids {', '.join(TEMPLATES)} or a text containing both <subj> and <obj> "
            f"(and optionally <mask>)"
        )
    return template


def check_template_for_tokenizer(template: str, mask_token: str | None, model_name: str = "the model") -> None:
    """Fail clearly when the template needs a mask token the tokenizer lacks (decoder-only LMs)."""
    if MASK in template and not mask_token:
        raise ModelError(
            f"the template uses <mask> but the tokenizer of {model_name} has no mask token "
            f"(decoder-only LMs have none); fix: pass a template without <mask>, e.g. "
            f"--template \"Today, I finally discovered the relation between <subj> and <obj> :\" "
            f"with --pooling last or average"
        )


def fill_template(template: str, head: str, tail: str, mask_token: str | None = None) -> str:
    """Put (head, tail) into ``template`` in a single pass.

    Single-pass substitution, so a word that itself contains ``<obj>`` or ``<mask>`` is kept
    as text instead of being substituted again (the public code's chained ``replace`` would).
    """
    values = {SUBJ: head, OBJ: tail, MASK: mask_token if mask_token is not None else MASK}
    return _SLOT.sub(lambda m: values[m.group(0)], template)
