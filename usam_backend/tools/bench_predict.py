"""``usam bench-predict``: per-image /predict latency over real HTTP, first call vs cached image.

Everything runs on loopback in this process: the backend (uvicorn in a thread), an image host,
and the client. Weights are random unless a checkpoint is on disk, and the head is random with
its score threshold set so that ``keep`` of the grid points pass, like a head that finds a few
objects; timings are real either way.
"""

from __future__ import annotations

import http.server
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from usam_backend.core.settings import Settings
from usam_backend.core.timing import PeakMemory
from usam_backend.sam.engine import SamEngine
from usam_backend.server.app import create_app
from usam_backend.server.service import Backend
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.tools.bench import bench_image, keep_threshold, random_head

CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="class_{i}"/>' for i in range(5))
    + "</BrushLabels></View>"
)


@dataclass
class Latency:
    sam_type: str
    weights: str
    device: str
    size: int
    regions: int
    first: float
    cached: list[float]
    setup: float

    def report(self) -> str:
        random_note = "random weights, timings are real" if self.weights.startswith("random") else self.weights
        return "\n".join(
            [
                f"usam bench-predict: SAM {self.sam_type} ({random_note}), {self.size}x{self.size} PNG, "
                f"device {self.device}, {torch.get_num_threads()} CPU threads, {self.regions} regions per image",
                f"/predict, first call (fetch, encoder, decoder, masks, RLE): {self.first:.2f} s",
                f"/predict, same image again (cached embedding), median of {len(self.cached)}: "
                f"{statistics.median(self.cached):.2f} s",
                f"/setup: {self.setup * 1000:.0f} ms",
            ]
        )


def run_predict_latency(settings: Settings, *, size: int = 1024, repeat: int = 3, keep: float = 0.25) -> Latency:
    with tempfile.TemporaryDirectory(prefix="usam-bench-") as tmp:
        root = Path(tmp)
        settings, random_weights = _prepare(settings, root, bench_image(size), keep)
        backend = Backend(settings)
        engine = backend.sam.get()
        server, url = _serve(backend)
        host, image_url = _image_host(root / "www")
        try:
            client = httpx.Client(base_url=url, timeout=600)
            started = time.perf_counter()
            client.post("/setup", json={"project": "1.1", "schema": CONFIG}).raise_for_status()
            setup = time.perf_counter() - started
            body = {"tasks": [{"id": 1, "data": {"image": image_url}}], "project": "1.1"}
            timings = []
            for _ in range(repeat + 1):
                started = time.perf_counter()
                response = client.post("/predict", json=body)
                response.raise_for_status()
                timings.append(time.perf_counter() - started)
            regions = len(response.json()["results"][0]["result"])
        finally:
            server.should_exit = True
            host.shutdown()
        weights = "random" if random_weights else engine.sam.weights
        return Latency(engine.sam.sam_type, weights, str(engine.device), size, regions, timings[0], timings[1:], setup)


def _prepare(
    settings: Settings, root: Path, image: np.ndarray, keep: float, name: str = "bench.png"
) -> tuple[Settings, bool]:
    """Checkpoint (random if none on disk), a random head, and the threshold that keeps ``keep``."""
    engine = SamEngine.from_settings(settings.replace(embedding_cache_size=0), allow_random=True)
    checkpoint = settings.sam_checkpoint
    if engine.sam.random_weights and settings.sam_type != "tiny":
        checkpoint = root / "random-weights.pth"
        torch.save(engine.model.state_dict(), checkpoint)
    head = random_head(engine)
    head.save(root / "models" / "heads" / "random.pt")
    (root / "www").mkdir()
    Image.fromarray(image).save(root / "www" / name, quality=92)
    threshold, _ = keep_threshold(SemanticSegmenter(engine, head, points=settings.points), image, keep)
    prepared = settings.replace(
        sam_checkpoint=checkpoint,
        model_dir=root / "models",
        cache_dir=root / "cache",
        allowed_hosts=("127.0.0.1",),
        score_threshold=threshold,
    )
    return prepared, engine.sam.random_weights


def _serve(backend: Backend) -> tuple[uvicorn.Server, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend, loopback_only=True), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def _image_host(folder: Path, name: str = "bench.png") -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    return host, f"http://127.0.0.1:{host.server_port}/{name}"


@dataclass
class MemoryRow:
    megapixels: float
    width: int
    height: int
    kept_points: int
    regions: int
    seconds: float
    peak_bytes: int


def run_memory_bench(
    settings: Settings, *, megapixels: tuple[float, ...] = (1, 12, 48), keep: float = 1.0
) -> list[MemoryRow]:
    """Seconds and peak resident memory added by one ``/predict`` of a 4:3 JPEG of each size, with
    ``keep`` of the grid points over the threshold (1.0: every point kept, the worst case)."""
    rows = []
    for mp in megapixels:
        width = round((mp * 1e6 * 4 / 3) ** 0.5)
        height = round(width * 3 / 4)
        with tempfile.TemporaryDirectory(prefix="usam-bench-") as tmp:
            root = Path(tmp)
            image = bench_image((height, width))
            prepared, _ = _prepare(settings, root, image, keep, name="bench.jpg")
            prepared = prepared.replace(max_image_bytes=1 << 30, max_image_pixels=max(prepared.max_image_pixels,
                                                                                    width * height))  # fmt: skip
            threshold_kept = int(keep * prepared.points)
            del image
            backend = Backend(prepared)
            backend.sam.get()
            server, url = _serve(backend)
            host, image_url = _image_host(root / "www", "bench.jpg")
            try:
                client = httpx.Client(base_url=url, timeout=1800)
                client.post("/setup", json={"project": "1.1", "schema": CONFIG}).raise_for_status()
                body = {"tasks": [{"id": 1, "data": {"image": image_url}}], "project": "1.1"}
                with PeakMemory(interval=0.005) as peak:
                    started = time.perf_counter()
                    response = client.post("/predict", json=body)
                    seconds = time.perf_counter() - started
                response.raise_for_status()
                regions = len(response.json()["results"][0]["result"])
            finally:
                server.should_exit = True
                host.shutdown()
            rows.append(MemoryRow(mp, width, height, threshold_kept, regions, seconds, peak.host_bytes))
    return rows


def memory_report(rows: list[MemoryRow], limit_bytes: int = 2 << 30) -> str:
    lines = [
        f"usam bench-predict --megapixels: one /predict per image, {torch.get_num_threads()} CPU threads",
        "megapixels   width x height   kept points   regions   seconds   peak memory added   of the 2 GiB budget",
    ]
    for row in rows:
        lines.append(
            f"{row.megapixels:>10g}   {row.width:>5} x {row.height:<6}   {row.kept_points:>11}   {row.regions:>7}   "
            f"{row.seconds:>7.2f}   {row.peak_bytes / 2**20:>13.0f} MiB   {row.peak_bytes / limit_bytes:>17.0%}"
        )
    return "\n".join(lines)
