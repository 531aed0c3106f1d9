"""Everything that shapes a head, carried by every training request.

A server decides what to train; a worker, possibly on another machine with another environment,
trains it. The worker trains exactly the recipe it was sent (grid points, seed, data source,
images per class, epochs), and refuses a recipe for SAM weights other than its own: a head on
other weights would be published and never served.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from usam_backend.core.errors import ConfigurationError
from usam_backend.core.labels import normalise
from usam_backend.core.settings import Settings


class RecipeMismatch(ConfigurationError):
    """A worker was asked to train for SAM weights it does not run."""


def resolve_source_name(settings: Settings, cuda: bool) -> str:
    """``USAM_DATA_SOURCE``, with ``auto`` made concrete: synthetic with CUDA, else web."""
    if settings.data_source != "auto":
        return settings.data_source
    return "synthetic" if cuda else "web"


@dataclass(frozen=True)
class Recipe:
    """The settings that shape a head. ``sam_fingerprint`` names the SAM weights (None: the
    official ``sam_type`` checkpoint, not downloaded yet when the recipe was written)."""

    sam_type: str
    sam_fingerprint: str | None
    points: int
    seed: int
    data_source: str
    images_per_class: int
    train_epochs: int

    @classmethod
    def from_settings(cls, settings: Settings, *, cuda: bool, sam_fingerprint: str | None) -> Recipe:
        return cls(
            sam_type=settings.sam_type,
            sam_fingerprint=sam_fingerprint,
            points=settings.points,
            seed=settings.seed,
            data_source=resolve_source_name(settings, cuda),
            images_per_class=settings.images_per_class,
            train_epochs=settings.train_epochs,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        names = {f.name for f in fields(cls)}
        missing = names - set(raw)
        if missing:
            raise ConfigurationError(f"a training request lacks {', '.join(sorted(missing))} in its recipe")
        return cls(**{key: raw[key] for key in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, settings: Settings) -> Settings:
        """This worker's settings, with what shapes the head taken from the recipe."""
        return settings.replace(
            points=self.points, seed=self.seed, data_source=self.data_source,
            images_per_class=self.images_per_class, train_epochs=self.train_epochs,
        )  # fmt: skip

    def check_sam_type(self, sam_type: str) -> None:
        """Before loading anything: the worker runs the SAM type the recipe names."""
        if sam_type != self.sam_type:
            raise RecipeMismatch(
                f"this job trains a head for SAM {self.sam_type} ({self.sam_fingerprint or 'official weights'}), but "
                f"this worker runs SAM {sam_type} (USAM_SAM_TYPE): give the worker the server's USAM_SAM_TYPE and "
                "USAM_SAM_CHECKPOINT"
            )

    def check_weights(self, fingerprint: str) -> None:
        """After loading: the worker's weights are those the recipe was written for."""
        if self.sam_fingerprint is not None and fingerprint != self.sam_fingerprint:
            raise RecipeMismatch(
                f"this job trains a head for SAM weights {self.sam_fingerprint}, but this worker loaded {fingerprint}: "
                "give the worker the server's USAM_SAM_CHECKPOINT"
            )

    def digest(self, *parts: str) -> str:
        """16 hex digits naming this recipe together with ``parts`` (labels, a project...)."""
        shaping = [*parts, *(str(value) for value in asdict(self).values())]
        return hashlib.sha256("\x1f".join(shaping).encode()).hexdigest()[:16]


def label_set(labels: list[str]) -> list[str]:
    """Labels as a set, order and case free (what a job for a label set is named by)."""
    return sorted({normalise(label) for label in labels})
