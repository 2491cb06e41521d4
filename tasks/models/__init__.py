"""The model zoo, user models, checkpoints, and where base weights come from (file, MLflow registry, runs:/)."""

from tasks.models.checkpoint import load_checkpoint, save_checkpoint
from tasks.models.register_base import register_base_model
from tasks.models.registry import MODELS, create_model, register_model
from tasks.models.sources import ResolvedBase, load_base, resolve_base

__all__ = [
    "MODELS", "ResolvedBase", "create_model", "load_base", "load_checkpoint", "register_base_model",
    "register_model", "resolve_base", "save_checkpoint",
]
