"""relbert-ds: RelBERT relation embeddings trained at scale with DeepSpeed.

Importing the package launches nothing: the public API is plain Python objects.
"""
from relbert_ds._version_check import check_torch

check_torch()  # torch older than setup.cfg's lower bound: one clear ImportError line, before anything fails oddly
from relbert_ds.errors import CheckpointError, ConfigError, DataError, ModelError, UserError
from relbert_ds.model.encoder import RelationEncoder  # noqa: E402
from relbert_ds.model.pooling import POOLING_MODES
from relbert_ds.model.prompts import TEMPLATES

__version__ = "0.1.0"

__all__ = ["RelationEncoder", "TEMPLATES", "POOLING_MODES", "UserError", "ConfigError", "DataError",
           "ModelError", "CheckpointError", "__version__"]
