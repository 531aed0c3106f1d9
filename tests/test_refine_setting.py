"""USAM_REFINE: predictions post-processed by UO-SAM's refinement, and what comes back is what the
refinement answered (not the unrefined masks, and not nothing)."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

import usam_backend.labelstudio.tasks as tasks_module
from usam_backend.server.service import PredictRequest

from conftest import scene
from helpers import WebHost, tiny_backend

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Sky" predicted_values="sky"/><Label value="tomato"/></BrushLabels></View>"""
H, W = 96, 128


@pytest.fixture
def served(tmp_path, trained_head):
    (tmp_path / "www").mkdir()
    Image.fromarray(scene((H, W), [("tomato", (10, 20, 60, 80)), ("sky", (70, 5, 120, 50))], seed=3)).save(
        tmp_path / "www" / "a.png"
    )
    trained_head.save(tmp_path / "models" / "heads" / "head.pt")
    host = WebHost(tmp_path / "www")
    yield host, tmp_path
    host.stop()


@pytest.mark.parametrize(("mode", "local", "global_"), [("local", True, False), ("global", False, True),
                                                        ("both", True, True)])  # fmt: skip
def test_usam_refine_answers_the_refined_regions(served, monkeypatch, mode, local, global_):
    host, tmp_path = served
    calls = []

    def refined(image, coarse, predictor, *, generator=None, local=True, **options):
        """Stands in for refine_masks: survivor 1 becomes a known rectangle, the others are dropped."""
        calls.append({"coarse": coarse.copy(), "local": local, "generator": generator is not None, **options})
        out = np.zeros_like(coarse)
        out[30:50, 40:90] = 1
        return out

    monkeypatch.setattr(tasks_module, "refine_masks", refined)
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": f"{host.url}/a.png"}}], label_config=CONFIG)
    plain = tiny_backend(tmp_path).predict(request)[0]
    assert plain["result"] and calls == []  # USAM_REFINE=off: nothing refined
    answer = tiny_backend(tmp_path, refine=mode).predict(request)[0]
    (call,) = calls
    assert (call["local"], call["generator"]) == (local, global_)
    painted = {int(v) for v in np.unique(call["coarse"]) if v}
    assert painted == set(range(1, len(painted) + 1)) and len(painted) >= 1  # every survivor, numbered from 1
    (region,) = answer["result"]  # only what the refinement kept
    mask = decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127
    expected = np.zeros((H, W), bool)
    expected[30:50, 40:90] = True
    assert np.array_equal(mask, expected)
