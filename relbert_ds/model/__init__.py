"""The model: a word pair -> a prompt -> a backbone -> one pooled relation vector.

``prompts`` (templates), ``pooling``, ``backbones`` (loading a backbone and its tokenizer), ``encoder``
(``RelationEncoder``: inference API, saving and loading), ``batching`` (how the encoder batches pairs)
and ``similarity`` (the cosine). Imports only ``relbert_ds.data`` and ``relbert_ds.errors``: using a
``RelationEncoder`` loads neither DeepSpeed nor the evaluator.
"""
