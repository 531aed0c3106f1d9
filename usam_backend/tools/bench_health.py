"""``usam bench-health``: ``/health`` latency with many heads on disk and many projects.

A model folder of ``heads`` random head files (most of them project heads, as if none were ever
pruned) and ``projects`` project records is served on loopback; the first ``/health`` reads every
head file once, the next ones only look at what changed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from training.head import Head, HeadConfig, HeadNet
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.projects import ProjectRecord, ProjectStore
from usam_backend.server.service import Backend
from usam_backend.tools.bench_predict import _serve

LABELS = ("cat", "dog", "horse", "cow", "sheep", "bird", "car", "bus", "person", "tree")
BUDGET_MS = 100.0


def _config(labels: list[str]) -> str:
    inner = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{inner}</BrushLabels></View>'
    )


def _head(classes: tuple[str, ...], project: str | None, seed: int) -> Head:
    config = HeadConfig(input_dim=256, num_classes=len(classes), hidden=(16,))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = HeadNet(config)
    info: dict[str, object] = {"sam_type": "tiny"}
    if project is not None:
        info["feedback"] = {"project": project}
    return Head(net, config, classes, info)


def run_health_bench(*, heads: int = 1000, projects: int = 100, repeat: int = 20) -> str:
    with tempfile.TemporaryDirectory(prefix="usam-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(sam_type="tiny", device="cpu", model_dir=root / "models", cache_dir=root / "cache")
        store = ProjectStore(settings.model_dir / "projects")
        for p in range(projects):
            labels = [LABELS[(p + i) % len(LABELS)] for i in range(3)]
            store.put(ProjectRecord(str(p + 1), _config(labels)))
        folder = settings.model_dir / "heads"
        started = time.perf_counter()
        for h in range(heads):
            classes = tuple(LABELS[(h + i) % len(LABELS)] for i in range(3))
            project = str(h % projects + 1) if h % 10 else None  # 9 in 10 trained on a project's annotations
            _head(classes, project, h).save(folder / f"head-{h:05d}.pt")
        written = time.perf_counter() - started
        backend = Backend(settings)
        server, url = _serve(backend)
        try:
            client = httpx.Client(base_url=url, timeout=600)
            started = time.perf_counter()
            first = client.get("/health")
            cold = time.perf_counter() - started
            first.raise_for_status()
            timings = []
            for _ in range(repeat):
                started = time.perf_counter()
                client.get("/health").raise_for_status()
                timings.append(time.perf_counter() - started)
        finally:
            server.should_exit = True
        body = first.json()
    warm = statistics.median(timings) * 1000
    return "\n".join(
        [
            f"usam bench-health: {heads} head files ({sum(1 for h in range(heads) if h % 10)} project heads), "
            f"{projects} projects ({written:.1f} s to write them)",
            f"/health, first call (reads every head file once): {cold * 1000:.0f} ms",
            f"/health, median of {repeat}: {warm:.1f} ms ({warm / BUDGET_MS:.0%} of the {BUDGET_MS:.0f} ms budget), "
            f"slowest {max(timings) * 1000:.1f} ms",
            f"heads listed {len(body['heads'])}, projects {len(body['projects'])}",
        ]
    )
