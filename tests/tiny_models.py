"""Tiny random backbones saved as real Hugging Face folders, for tests of mechanics.

They use the bundled backbone's WordPiece vocabulary so that prompts tokenize realistically;
the decoder-only ones get a tokenizer without a mask token, like real decoder LMs.
"""
from __future__ import annotations

from pathlib import Path

from relbert_ds.model.backbones import bundled_backbone_path


def _bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_backbone_path())


def _maskless_tokenizer():
    from transformers import PreTrainedTokenizerFast

    base = _bert_tokenizer()
    # Same vocabulary and pre-processing, but no mask token: what GPT-2/Llama tokenizers look like.
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="[PAD]", eos_token="[SEP]",
                                   bos_token="[CLS]", unk_token="[UNK]", model_max_length=512)


def make_tiny_bert(directory: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A 2-layer random BERT (about 1M parameters, mostly the embedding table)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = _bert_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def make_tiny_llama(directory: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A 2-layer random Llama-family decoder with a mask-less tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer = _maskless_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=hidden * 2,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    LlamaModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def make_tiny_gpt2(directory: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A 2-layer random GPT-2 with a mask-less tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    tokenizer = _maskless_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
    GPT2Model(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)
