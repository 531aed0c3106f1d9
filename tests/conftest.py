"""Shared fixtures: a tiny real SAM, generated class images, and a head trained on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.head import Head
from usam_backend.sam.engine import SamEngine
from usam_backend.settings import Settings

CLASS_COLORS = {"tomato": (220, 40, 30), "sky": (40, 90, 230)}


def scene(size: tuple[int, int], shapes: list[tuple[str, tuple[int, int, int, int]]], seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image: a noisy grey background with filled class-coloured boxes (XYXY)."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.normal(128, 18, size=(height, width, 3)).clip(0, 255)
    for name, (x0, y0, x1, y1) in shapes:
        image[y0:y1, x0:x1] = np.asarray(CLASS_COLORS[name]) + rng.normal(0, 8, size=(y1 - y0, x1 - x0, 3))
    return image.clip(0, 255).astype(np.uint8)


def write_class_folders(root: Path, per_class: int = 6, size: int = 96) -> Path:
    """``root/<class>/NNN.png``: one object of the class per image, at a random place and size."""
    rng = np.random.default_rng(1)
    for name in CLASS_COLORS:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(size // 2, size - 8))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
            image = scene((size, size), [(name, (x0, y0, x0 + side, y0 + side))], seed=100 * i + len(name))
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(sam_type="tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"), points=64)


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings: Settings) -> SamEngine:
    return SamEngine.from_settings(tiny_settings)


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("classes"))


@pytest.fixture(scope="session")
def trained_head(tiny_settings: Settings, tiny_engine: SamEngine, class_dir: Path, tmp_path_factory) -> Head:
    from training.pipeline import train_from_folders

    out = tmp_path_factory.mktemp("heads") / "head.pt"
    result = train_from_folders(tiny_settings, class_dir, out, engine=tiny_engine, epochs=30, progress=False)
    return result.head


@pytest.fixture
def two_object_image() -> np.ndarray:
    """tomato on the left, sky on the right, grey elsewhere: 160 x 240."""
    return scene((160, 240), [("tomato", (20, 30, 100, 130)), ("sky", (140, 30, 220, 130))], seed=7)
