"""Training usam's classifier head on SAM point embeddings (U-SAM's MIL + uncertainty distillation).

Public API: :func:`train_head` and :class:`Head`.
"""

from training.head import Head
from training.train import train_head

__all__ = ["Head", "train_head"]
