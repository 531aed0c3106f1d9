"""Measurements of what hostile inputs and long video work cost the server: run
``.venv/bin/python tests/hostile_inputs.py [--sam tiny|vit_t]``; it prints one line per figure.

- *sequence*: peak RSS growth of one ``/predict`` on a frame sequence whose first frame is 16x16 and
  whose 40 next frames are 24-megapixel images (solid colour: tiny downloads, large once decoded).
- *stroke*: peak RSS growth of one smart-brush request whose RLE header claims 2^32-1 values.
- *liveness*: the slowest of several ``/predict`` calls on an image whose embedding is cached, made
  while a video job finds objects frame by frame in the same process, against one frame's work.

Each figure is measured in a fresh process (peak RSS is a high-water mark). Random weights: the
timings are real, the masks are not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _settings(tmp: Path, sam: str):  # type: ignore[no-untyped-def]
    from usam_backend.core.settings import Settings

    return Settings(sam_type=sam, device="cpu", points=64, cache_dir=tmp / "cache", model_dir=tmp / "models",
                    allowed_hosts=("127.0.0.1",), score_threshold=0.2)  # fmt: skip


def _head(tmp: Path, sam: str) -> None:
    """A head with random weights over two classes (speed and memory only)."""
    import torch

    from training.head import Head, HeadConfig, HeadNet
    from usam_backend.sam.models import TINY_DIM

    torch.manual_seed(0)
    config = HeadConfig(input_dim=4 * (TINY_DIM if sam == "tiny" else 256), num_classes=2)
    Head(HeadNet(config), config, ("cat", "dog"), {"sam_type": sam, "points": 64}).save(
        tmp / "models" / "heads" / "head.pt"
    )


SEQUENCE = """<View><Image name="frames" valueList="$frames"/><BrushLabels name="tag" toName="frames">
<Label value="cat"/></BrushLabels></View>"""
BRUSH = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" smart="true">
<Label value="cat"/></BrushLabels></View>"""


def sequence(sam: str) -> dict[str, float]:
    from PIL import Image

    from usam_backend.server.service import Backend, PredictRequest

    from helpers import WebHost

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "www").mkdir()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp / "www" / "tiny.png")
        Image.new("RGB", (6000, 4000), (30, 200, 30)).save(tmp / "www" / "big.png")
        _head(tmp, sam)
        host = WebHost(tmp / "www")
        backend = Backend(_settings(tmp, sam))
        task = {"id": 1, "data": {"frames": [f"{host.url}/tiny.png"] + [f"{host.url}/big.png"] * 40}}
        before = _rss_mib()
        (answer,) = backend.predict(PredictRequest(tasks=[task], label_config=SEQUENCE))
        growth = _rss_mib() - before
        host.stop()
        return {"peak_rss_growth_mib": round(growth, 1), "regions": len(answer["result"])}


def stroke(sam: str) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from usam_backend.server.service import Backend, PredictRequest

    from helpers import WebHost

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "www").mkdir()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp / "www" / "a.png")
        _head(tmp, sam)
        host = WebHost(tmp / "www")
        backend = Backend(_settings(tmp, sam))
        # Label Studio's brush RLE: a 32-bit count of values, a 5-bit word size, four 4-bit run-length
        # sizes, then runs; this one claims 2^32-1 values and then repeats long runs (221 kB, 1.1 MB of JSON)
        bits = f"{2**32 - 1:032b}{7:05b}" + "".join(f"{w - 1:04b}" for w in (3, 4, 8, 16)) + "1" * 27 * 65536
        bits += "0" * (-len(bits) % 8)
        rle = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
        item = {"id": "s", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": 64,
                "original_height": 64, "value": {"format": "rle", "rle": rle, "brushlabels": ["cat"]}}  # fmt: skip
        task = {"id": 1, "data": {"image": f"{host.url}/a.png"}}
        before = _rss_mib()
        try:
            backend.predict(PredictRequest(tasks=[task], label_config=BRUSH, params={"context": {"result": [item]}}))
            answered = "prediction"
        except Exception as exc:  # the HTTP layer turns these into 4xx
            answered = type(exc).__name__
        growth = _rss_mib() - before
        host.stop()
        return {"peak_rss_growth_mib": round(growth, 1), "answer": answered}  # type: ignore[dict-item]


def liveness(sam: str) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from usam_backend.labelstudio.config import parse_label_config
    from usam_backend.sam.shared import compute_lock, shared_engine
    from usam_backend.server.service import Backend, PredictRequest
    from usam_backend.systems.usam import SemanticSegmenter
    from usam_backend.systems.uvosam import detect

    from helpers import WebHost

    size = 512
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "www").mkdir()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp / "www" / "a.png")
        _head(tmp, sam)
        host = WebHost(tmp / "www")
        settings = _settings(tmp, sam)
        backend = Backend(settings)
        backend.tasks.engine = lambda: shared_engine(settings)  # the engine the video job uses too
        config = parse_label_config(BRUSH)
        request = PredictRequest(tasks=[{"id": 1, "data": {"image": f"{host.url}/a.png"}}], label_config=BRUSH)
        backend.predict(request)  # the image's embedding is cached from here on
        started = time.monotonic()
        backend.predict(request)
        alone = time.monotonic() - started
        choice = backend.registry.choose(config.labels, None)
        assert choice is not None
        segmenter = SemanticSegmenter.from_settings(shared_engine(settings), choice.head, settings)
        frames = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(8)]
        started = time.monotonic()
        detect(frames[:2], segmenter, lock=compute_lock)
        frame = (time.monotonic() - started) / 2
        slowest = {}
        for name, job in (
            ("lock_per_frame", lambda: detect(frames, segmenter, lock=compute_lock)),
            ("lock_per_chunk", lambda: _whole(compute_lock, lambda: detect(frames, segmenter))),
        ):  # fmt: skip
            worker = threading.Thread(target=job)
            worker.start()
            slowest[name] = 0.0
            while worker.is_alive():
                started = time.monotonic()
                backend.predict(request)
                slowest[name] = round(max(slowest[name], time.monotonic() - started), 2)
                time.sleep(0.05)
            worker.join()
        host.stop()
        return {
            "cached_predict_s": round(alone, 2),
            "one_frame_s": round(frame, 2),
            "video_frames": len(frames),
            "slowest_predict_s": slowest,
            "goal_s": round(alone + frame, 2),
        }  # type: ignore[dict-item]


def _whole(lock, work):  # type: ignore[no-untyped-def]
    """The lock held around a whole chunk, as before it was taken per frame."""
    with lock:
        return work()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam", default="tiny", help="SAM type (random weights unless a checkpoint is cached)")
    parser.add_argument("--only", choices=("sequence", "stroke", "liveness"), help="one measurement, in this process")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(globals()[args.only](args.sam)))
        return
    for name in ("sequence", "stroke", "liveness"):
        run = subprocess.run([sys.executable, __file__, "--sam", args.sam, "--only", name], cwd=ROOT,
                             capture_output=True, text=True, check=False)  # fmt: skip
        line = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip()[-400:]
        print(f"{name:<9} {line}")


if __name__ == "__main__":
    main()
