"""Training: the run configuration, the world-size-invariant batch plan (``sampler``), the losses with
cross-device candidates, the DeepSpeed engine and its "auto" values, the schedule, the run directory and
checkpoints, the ``Trainer``, its monitor, the dry run and a run's figures.

The layer on top: it may import ``model``, ``data``, ``parallel``, ``evaluation`` (validation) and
``publish``; nothing below imports it. ``sampler`` and ``losses`` import no DeepSpeed.
"""
