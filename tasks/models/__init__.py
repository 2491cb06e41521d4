"""The model zoo, user models and checkpoints."""

from tasks.models.checkpoint import load_checkpoint, save_checkpoint
from tasks.models.registry import MODELS, create_model, register_model

__all__ = ["MODELS", "create_model", "load_checkpoint", "register_model", "save_checkpoint"]
