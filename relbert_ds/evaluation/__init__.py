"""The sharded evaluator: analogy questions, lexical relation classification, relation mapping.

``evaluate(encoder, ...)`` is the entry point for Python callers; ``launchers/evaluate.py`` is the
command line, and the trainer validates through ``validation`` (analogy accuracies on the same
sharded path). Modules: ``tasks`` (which datasets, loaded and validated), ``runner`` (the flow and
the multi-rank contract), ``report`` (metrics, table, JSON, TensorBoard), ``sharding`` (how inference
is split over ranks), ``analogy``, ``classification`` and ``probe``, ``mapping``, ``cache``.
"""
from relbert_ds.evaluation.analogy import score_analogy
from relbert_ds.evaluation.classification import ProbeOptions, run_classification
from relbert_ds.evaluation.mapping import load_mapping_dataset, run_mapping, solve_mapping
from relbert_ds.evaluation.report import flat_metrics, markdown_table, write_outputs, write_tensorboard
from relbert_ds.evaluation.runner import EncodingOptions, evaluate, evaluate_tasks
from relbert_ds.evaluation.sharding import deal_batches, encode_sharded
from relbert_ds.evaluation.tasks import TaskSet, prepare_tasks

__all__ = [
    "EncodingOptions",
    "ProbeOptions",
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
