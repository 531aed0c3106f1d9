"""Class images from Stable Diffusion (diffusers): ``a photo of a {label}``, seeded and batched.

The pipeline loads once per process (fp16 on CUDA), without a safety checker. Image ``i`` of a
label always comes from the same seed and is generated in the same batch (whole batches at fixed
index boundaries; extra images are kept for later), so a stopped job resumes with exactly the
images it would have made.
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

from training.class_store import ClassStore
from training.progress import Progress
from usam_backend.core.errors import DataError
from usam_backend.core.settings import Settings

DEFAULT_COUNT = 200
_load_lock = threading.Lock()


class SyntheticSource:
    name = "synthetic"

    def __init__(self, settings: Settings, store: ClassStore, *, cuda: bool):
        self.settings = settings
        self.store = store
        self.device = "cuda" if cuda and settings.device in ("auto", "cuda") else settings.device
        if self.device == "auto":
            self.device = "cpu"

    def key(self) -> str:
        s = self.settings
        shaping = f"{s.sd_model}|{s.sd_steps}|{s.sd_guidance}|{s.sd_size}|{s.prompt_template}|{s.seed}"
        return f"synthetic-{hashlib.sha256(shaping.encode()).hexdigest()[:12]}"

    def default_count(self) -> int | None:
        return DEFAULT_COUNT

    def collect(self, label: str, count: int | None, progress: Progress) -> list[Path]:
        count = count or DEFAULT_COUNT
        with self.store.open(self.key(), label) as folder:
            progress.advance(min(len(folder.manifest.images), count))
            while len(folder.manifest.images) < count:
                start = int(folder.manifest.cursor.get("next_index", 0))
                batch = self.settings.sd_batch
                for offset, (image, seed) in enumerate(self._generate(label, start, batch)):
                    meta = {"prompt": self._prompt(label), "seed": seed, "index": start + offset}
                    meta.update(model=self.settings.sd_model, steps=self.settings.sd_steps)
                    if folder.add(image, "png", meta) and len(folder.manifest.images) <= count:
                        progress.advance(1)
                folder.manifest.cursor["next_index"] = start + batch
                folder.save()
            return folder.paths(count)

    def describe(self, label: str) -> dict[str, object]:
        s = self.settings
        return {"source": "synthetic", "model": s.sd_model, "prompt": self._prompt(label), "steps": s.sd_steps,
                "guidance": s.sd_guidance, "size": s.sd_size}  # fmt: skip

    def _prompt(self, label: str) -> str:
        return self.settings.prompt_template.format(label=label)

    def _seed(self, label: str, index: int) -> int:
        digest = hashlib.sha256(f"{self.settings.seed}|{label}|{index}".encode()).digest()
        return int.from_bytes(digest[:4], "big")

    def _generate(self, label: str, start: int, batch: int) -> list[tuple[bytes, int]]:
        import torch

        pipeline = _pipeline(self.settings.sd_model, self.device)
        seeds = [self._seed(label, start + i) for i in range(batch)]
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        s = self.settings
        output: Any = pipeline(
            [self._prompt(label)] * batch,
            num_inference_steps=s.sd_steps,
            guidance_scale=s.sd_guidance,
            height=s.sd_size,
            width=s.sd_size,
            generator=generators,
            output_type="pil",
        )
        encoded = []
        for image, seed in zip(output.images, seeds, strict=True):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append((buffer.getvalue(), seed))
        return encoded


def release_pipelines() -> None:
    """Free the Stable Diffusion pipelines this process loaded (after a job: several GB each)."""
    if _pipeline.cache_info().currsize == 0:
        return
    _pipeline.cache_clear()
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.cache
def _pipeline(model: str, device: str) -> Any:
    """The Stable Diffusion pipeline, loaded once per process and device."""
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with _load_lock:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                model, dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as exc:
            raise DataError(
                f"could not load the Stable Diffusion model {model!r} ({str(exc).splitlines()[0][:200]}). Download "
                "it first (huggingface-cli download), set USAM_SD_MODEL to a local folder, or use "
                "USAM_DATA_SOURCE=web or folder"
            ) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
