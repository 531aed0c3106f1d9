"""Building usam's classifier heads on SAM point embeddings (U-SAM's MIL + uncertainty distillation).

The stable Python API (imported lazily: ``import training`` loads no torch)::

    from training import Head, train_head, train_from_folders

- :func:`train_head`: bags of point embeddings (N, d, D) and image labels -> a :class:`Head`;
- :class:`Head`: the self-describing artifact (``save``/``load``, ``predict_proba``);
- :func:`train_from_folders`: class folders of images -> a saved head (``usam train``);
- :class:`Recipe`: every setting that shapes a head.

Imports only ``usam_backend``'s ``core`` and ``sam`` layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usam_backend.core.lazy import lazy_exports

if TYPE_CHECKING:
    from training.head import Head, HeadConfig
    from training.pipeline import Trained, train_from_folders
    from training.recipe import Recipe
    from training.train import train_head

_EXPORTS = {
    "Head": "training.head",
    "HeadConfig": "training.head",
    "train_head": "training.train",
    "train_from_folders": "training.pipeline",
    "Trained": "training.pipeline",
    "Recipe": "training.recipe",
}

__all__ = [
    "Head",
    "HeadConfig",
    "Recipe",
    "Trained",
    "train_from_folders",
    "train_head",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
