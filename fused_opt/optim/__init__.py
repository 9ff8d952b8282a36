"""The optimizer classes: drop-in subclasses of their torch.optim twins."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
