import pytest

from relbert_ds.errors import ConfigError, ModelError
from relbert_ds.model.prompts import TEMPLATES, check_template_for_tokenizer, fill_template, resolve_template

APOS = "\u2019"


def test_templates_are_verbatim():
    # Written out independently of the module, character for character.
    expected = {
        "a": "Today, I finally discovered the relation between <subj> and <obj> : <subj> is the <mask> of <obj>",
        "b": "Today, I finally discovered the relation between <subj> and <obj> : <obj>  is <subj>'s <mask>",
        "c": "Today, I finally discovered the relation between <subj> and <obj> : <mask>",
        "d": "I wasn" + APOS + "t aware of this relationship, but I just read in the encyclopedia that "
             "<subj> is the <mask> of <obj>",
        "e": "I wasn" + APOS + "t aware of this relationship, but I just read in the encyclopedia that "
             "<obj>  is <subj>" + APOS + "s <mask>",
    }
    assert TEMPLATES == expected
    assert "<obj>  is" in TEMPLATES["b"] and "<obj>  is" in TEMPLATES["e"]  # two spaces
    assert TEMPLATES["d"].count(APOS) == 1 and TEMPLATES["e"].count(APOS) == 2
    assert "'" not in TEMPLATES["d"] + TEMPLATES["e"]


def test_fill_template_d():
    text = fill_template(resolve_template("d"), "raphael", "painter", "[MASK]")
    assert text == ("I wasn" + APOS + "t aware of this relationship, but I just read in the encyclopedia that "
                    "raphael is the [MASK] of painter")


def test_fill_is_single_pass():
    # A word containing a slot name is kept as text, not substituted again.
    assert fill_template("<subj> vs <obj>", "<obj>", "x") == "<obj> vs x"
    assert fill_template("<subj> <mask> <obj>", "a", "b") == "a <mask> b"


def test_user_template_accepted_and_validated():
    assert resolve_template("<subj> relates to <obj>") == "<subj> relates to <obj>"
    with pytest.raises(ConfigError, match="no <obj>"):
        resolve_template("the <subj> is a <mask>")
    with pytest.raises(ConfigError, match="no <subj> and no <obj>"):
        resolve_template("z")


def test_mask_template_needs_mask_token():
    check_template_for_tokenizer(TEMPLATES["a"], "[MASK]")
    check_template_for_tokenizer("<subj> and <obj>", None)
    with pytest.raises(ModelError, match="no mask token"):
        check_template_for_tokenizer(TEMPLATES["d"], None, "gpt2")
