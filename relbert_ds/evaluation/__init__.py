"""The sharded evaluator: analogy questions, lexical relation classification, relation mapping.

``evaluate(encoder, ...)`` is the entry point for Python callers (the trainer's per-epoch
validation included); ``launchers/evaluate.py`` is the command line. See ``runner`` for the
flow and the multi-rank contract, ``sharding`` for how inference is split over ranks.
"""
from relbert_ds.evaluation.analogy import score_analogy
from relbert_ds.evaluation.classification import run_classification
from relbert_ds.evaluation.mapping import load_mapping_dataset, run_mapping, solve_mapping
from relbert_ds.evaluation.runner import (
    TaskSet,
    evaluate,
    evaluate_tasks,
    flat_metrics,
    markdown_table,
    prepare_tasks,
    write_outputs,
    write_tensorboard,
)
from relbert_ds.evaluation.sharding import deal_batches, encode_sharded

__all__ = [
    "TaskSet",
    "deal_batches",
    "encode_sharded",
    "evaluate",
    "evaluate_tasks",
    "flat_metrics",
    "load_mapping_dataset",
    "markdown_table",
    "prepare_tasks",
    "run_classification",
    "run_mapping",
    "score_analogy",
    "solve_mapping",
    "write_outputs",
    "write_tensorboard",
]
