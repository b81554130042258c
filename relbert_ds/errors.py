"""Errors a user can cause, each carrying one clear message that names the problem and the fix.

Launchers catch :class:`UserError` and print ``error: <message>`` once (on rank 0 where ranks
exist) and exit non-zero; anything else is a bug in relbert-ds and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class of every error caused by user input (files, options, configs, models).

    The message is a single line: what is wrong, where, and how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    """An invalid option, config value or DeepSpeed JSON."""


class DataError(UserError):
    """A malformed or inconsistent data file, or an unknown dataset name."""


class ModelError(UserError):
    """A model that cannot be found or loaded, or a template/pooling it cannot support."""


class CheckpointError(UserError):
    """A checkpoint or run directory that does not match the run being started."""


class DiskFullError(CheckpointError):
    """The file system of --output_dir has no room for the next checkpoint (found before writing,
    or while writing: the partial checkpoint folder is removed, ``latest`` is untouched)."""


class TrainingDiverged(UserError):
    """The loss or the gradients stayed non-finite for --max_nonfinite_steps optimizer steps in a row:
    the run stops without exporting, its last checkpoint from before the divergence kept."""

    exit_code = 3


class DistributedError(UserError):
    """A rank that cannot join the job (master unreachable, inconsistent world size)."""


class HubError(UserError):
    """Publishing to the Hugging Face hub failed: no token, repo exists, hub unreachable, not an export."""
