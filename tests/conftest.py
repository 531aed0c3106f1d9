"""Shared fixtures: a tiny real SAM, generated class images, and a head trained on them."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.head import Head
from usam_backend.core.settings import Settings, get_settings
from usam_backend.sam.engine import SamEngine

from helpers import LabelStudioServer, free_port, label_studio_binary, wait_until

CLASS_COLORS = {"tomato": (220, 40, 30), "sky": (40, 90, 230), "grass": (40, 170, 40)}


def scene(size: tuple[int, int], shapes: list[tuple[str, tuple[int, int, int, int]]], seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image: a noisy grey background with filled class-coloured boxes (XYXY)."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.normal(128, 18, size=(height, width, 3)).clip(0, 255)
    for name, (x0, y0, x1, y1) in shapes:
        image[y0:y1, x0:x1] = np.asarray(CLASS_COLORS[name]) + rng.normal(0, 8, size=(y1 - y0, x1 - x0, 3))
    return image.clip(0, 255).astype(np.uint8)


def write_class_folders(
    root: Path, per_class: int = 6, size: int = 96, names: tuple[str, ...] = ("tomato", "sky")
) -> Path:
    """``root/<class>/NNN.png``: one object of the class per image, at a random place and size."""
    rng = np.random.default_rng(1)
    for name in names:
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


@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline from diffusers' real classes, saved to a local folder.

    The tokenizer is built offline from a small vocabulary (letters only), so nothing is downloaded.
    """
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-sd")
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="!"
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, layer_norm_eps=1e-05,
            num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("USAM_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed: run `make test` (it installs Debian's redis-server)")
        pytest.skip("redis-server is not installed here; `make test` installs it")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    from redis import Redis

    client = Redis(port=port)
    wait_until(lambda: bool(client.ping()), 20, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio 1.23.2 for every end-to-end test file."""
    binary = label_studio_binary()
    if binary is None:
        if os.environ.get("USAM_REQUIRE_LABEL_STUDIO"):
            pytest.fail("Label Studio 1.23.2 is not installed: run `make test` (it installs it in its own venv)")
        pytest.skip("Label Studio 1.23.2 is not installed here; `make test` installs it")
    server = LabelStudioServer(binary, tmp_path_factory.mktemp("label-studio"))
    yield server
    server.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """With ``USAM_REQUIRE_S3`` (``make test`` sets it), a test on the local S3 server (the ``s3``
    fixture: moto and boto3) fails without them instead of skipping, before any fixture is set up."""
    if not os.environ.get("USAM_REQUIRE_S3") or "s3" not in getattr(item, "fixturenames", ()):
        return
    for module in ("boto3", "moto.server"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"{module} cannot be imported ({exc}): run `make test` (it installs the dev extras)")


@pytest.fixture
def isolated_settings(tmp_path, monkeypatch):
    """Settings read afresh from an environment whose cache is this test's own (CLI tests)."""
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
