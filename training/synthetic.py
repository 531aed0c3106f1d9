"""Synthetic clustered bags that behave like SAM point embeddings of U-SAM's data.

Training bags are single-object "class images" from a source domain: a share of the grid points
lies on the object (one of a few part clusters of its class), the rest on backgrounds, and each
class is often photographed against the same few backgrounds (a spurious context cue). Test bags
come from a shifted target domain, hold 1-3 objects each, and have instance labels, so a head can
be scored per point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticBags:
    """bags (N, d, D) float32; targets (N, C) float32 multi-hot; labels (N, d) int, -1 background."""

    bags: np.ndarray
    targets: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SyntheticWorld:
    """Cluster centres shared by the source and target domains."""

    parts: np.ndarray  # C, P, D object part centres
    backgrounds: np.ndarray  # G, D background centres
    context: np.ndarray  # C, 2 background indices each class is usually seen with
    shift: np.ndarray  # D, target-domain offset
    mix: np.ndarray  # D, D target-domain distortion

    @property
    def num_classes(self) -> int:
        return int(self.parts.shape[0])


def make_world(
    classes: int = 5,
    dim: int = 64,
    parts: int = 3,
    backgrounds: int = 10,
    shift: float = 0.8,
    distortion: float = 0.15,
    separation: float = 1.0,
    seed: int = 0,
) -> SyntheticWorld:
    rng = np.random.default_rng(seed)
    centres = separation * rng.normal(size=(classes, 1, dim))
    part_centres = centres + 0.6 * separation * rng.normal(size=(classes, parts, dim))
    context = np.stack([rng.choice(backgrounds, size=2, replace=False) for _ in range(classes)])
    mix = np.eye(dim) + distortion * rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return SyntheticWorld(
        parts=part_centres,
        backgrounds=separation * rng.normal(size=(backgrounds, dim)),
        context=context,
        shift=shift * rng.normal(size=dim),
        mix=mix,
    )


def source_bags(
    world: SyntheticWorld,
    per_class: int = 40,
    points: int = 100,
    noise: float = 0.7,
    context_bias: float = 0.7,
    seed: int = 1,
) -> SyntheticBags:
    """Single-label training bags from the source domain."""
    rng = np.random.default_rng(seed)
    bags, targets, labels = [], [], []
    for c in range(world.num_classes):
        for _ in range(per_class):
            owners = np.full(points, -1)
            owners[: rng.integers(int(0.15 * points), int(0.5 * points) + 1)] = c
            background = _backgrounds(world, rng, c if rng.random() < context_bias else None)
            bags.append(_sample(world, rng, owners, background, noise))
            targets.append(np.eye(world.num_classes)[c])
            labels.append(owners)
    return _pack(bags, targets, labels, rng)


def target_bags(
    world: SyntheticWorld, images: int = 100, points: int = 100, noise: float = 0.7, seed: int = 2
) -> SyntheticBags:
    """Multi-object test bags from the shifted target domain, with instance labels."""
    rng = np.random.default_rng(seed)
    bags, targets, labels = [], [], []
    for _ in range(images):
        present = rng.choice(world.num_classes, size=rng.integers(1, 4), replace=False)
        owners = np.full(points, -1)
        start = 0
        for c in present:
            size = int(rng.integers(int(0.1 * points), int(0.3 * points) + 1))
            owners[start : start + size] = c
            start += size
        embedded = _sample(world, rng, owners, _backgrounds(world, rng, None), noise)
        bags.append(embedded @ world.mix + world.shift)
        targets.append(np.eye(world.num_classes)[present].sum(axis=0))
        labels.append(owners)
    return _pack(bags, targets, labels, rng)


def _backgrounds(world: SyntheticWorld, rng: np.random.Generator, context_of: int | None) -> np.ndarray:
    if context_of is not None:
        return world.context[context_of]
    return rng.choice(len(world.backgrounds), size=rng.integers(1, 3), replace=False)


def _sample(
    world: SyntheticWorld, rng: np.random.Generator, owners: np.ndarray, background: np.ndarray, noise: float
) -> np.ndarray:
    dim = world.parts.shape[2]
    out = np.empty((len(owners), dim))
    for i, owner in enumerate(owners):
        if owner >= 0:
            out[i] = world.parts[owner, rng.integers(world.parts.shape[1])]
        else:
            out[i] = world.backgrounds[rng.choice(background)]
    return out + noise * rng.normal(size=out.shape)


def _pack(bags: list, targets: list, labels: list, rng: np.random.Generator) -> SyntheticBags:
    order = [rng.permutation(len(owner)) for owner in labels]  # grid order carries no label
    return SyntheticBags(
        bags=np.stack([b[o] for b, o in zip(bags, order, strict=True)]).astype(np.float32),
        targets=np.stack(targets).astype(np.float32),
        labels=np.stack([lab[o] for lab, o in zip(labels, order, strict=True)]),
    )
