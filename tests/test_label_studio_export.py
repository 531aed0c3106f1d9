"""End to end against a real Label Studio 1.23.2: ``usam export`` of an image project (rectangle,
polygon and brush annotations, two annotations on one task, a prediction of one model version), a
frame-sequence project and a video project with a videorectangle track, read back by the field's
readers: pycocotools, Ultralytics' layout, motmetrics, ``usam eval masks`` and ``usam eval video``.
The annotations are made through Label Studio's API from known masks (the brush with the SDK's own
``mask2rle``), so every round trip compares the export with the masks it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from usam_backend.cli import main
from usam_backend.core.settings import Settings, get_settings
from usam_backend.core.shapes import polygons_mask
from usam_backend.core.video import write_video
from usam_backend.tools.export import ExportOptions, run_export
from usam_backend.tools.refine_files import evaluate_folders
from usam_backend.tools.video_files import indexed_png

from conftest import scene
from helpers import WebHost

pytestmark = pytest.mark.labelstudio

H, W = 64, 96
LABELS = ("cat", "dog", "bird")
IMAGE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image">{labels}</RectangleLabels>'
    '<PolygonLabels name="outline" toName="image">{labels}</PolygonLabels>'
    '<BrushLabels name="brush" toName="image">{labels}</BrushLabels></View>'
)
SEQUENCE_CONFIG = (
    '<View><Image name="image" valueList="$frames"/>'
    '<BrushLabels name="brush" toName="image">{labels}</BrushLabels>'
    '<PolygonLabels name="outline" toName="image">{labels}</PolygonLabels></View>'
)
VIDEO_CONFIG = (
    '<View><Video name="video" value="$video"/><Labels name="labels" toName="video">{labels}</Labels>'
    '<VideoRectangle name="track" toName="video"/></View>'
)


def config(template: str) -> str:
    return template.format(labels="".join(f'<Label value="{v}"/>' for v in LABELS))


def pct(points: np.ndarray) -> list[list[float]]:
    return (np.asarray(points, dtype=float) / [W, H] * 100).tolist()


def image_results(to: str = "image", item_index: int | None = None, shift: int = 0) -> tuple[list[dict], np.ndarray]:
    """A rectangle (dog), a triangle polygon (bird) and a brush ring (cat), and their label map."""
    yy, xx = np.mgrid[0:H, 0:W]
    ring = ((xx - 20 - shift) ** 2 + (yy - 20) ** 2 < 14**2) & ~((xx - 20 - shift) ** 2 + (yy - 20) ** 2 < 5**2)
    triangle = np.array([[50.0, 6.0], [90.0, 6.0], [90.0, 30.0]])
    truth = np.zeros((H, W), dtype=np.uint8)
    truth[40:60, 10 + shift : 40 + shift] = 2
    truth[polygons_mask([triangle], H, W)] = 3
    truth[ring] = 1
    common = {"to_name": to, "original_width": W, "original_height": H, "image_rotation": 0}
    if item_index is not None:
        common["item_index"] = item_index
    rect = {
        "x": 100 * (10 + shift) / W,
        "y": 100 * 40 / H,
        "width": 100 * 30 / W,
        "height": 100 * 20 / H,
        "rotation": 0,
        "rectanglelabels": ["dog"],
    }
    results = [
        {**common, "id": f"r{item_index}", "from_name": "box", "type": "rectanglelabels", "value": rect},
        {
            **common,
            "id": f"p{item_index}",
            "from_name": "outline",
            "type": "polygonlabels",
            "value": {"points": pct(triangle), "closed": True, "polygonlabels": ["bird"]},
        },
        {
            **common,
            "id": f"b{item_index}",
            "from_name": "brush",
            "type": "brushlabels",
            "value": {"format": "rle", "rle": mask2rle(ring.astype(np.uint8) * 255), "brushlabels": ["cat"]},
        },
    ]
    return results, truth


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-media")
    for name, seed in (("first.png", 1), ("second.png", 2)):
        Image.fromarray(scene((H, W), [("tomato", (10, 10, 40, 40))], seed=seed)).save(folder / name)
    for t in range(4):
        Image.fromarray(scene((H, W), [("tomato", (10 + 2 * t, 10, 40, 40))], seed=t)).save(folder / f"frame{t}.png")
    write_video(folder / "clip.mp4", [scene((H, W), [("tomato", (t, 10, 40, 40))], seed=t) for t in range(12)], 24)
    host = WebHost(folder)
    yield folder, host
    host.stop()


@pytest.fixture
def settings(label_studio, tmp_path) -> Settings:
    return Settings(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.personal_token(),
        allowed_hosts=("127.0.0.1",),
        cache_dir=tmp_path / "cache",
        model_dir=tmp_path / "models",
    )


def test_image_project_exports_to_coco_yolo_and_label_maps(label_studio, media, settings, tmp_path, monkeypatch):
    from pycocotools.coco import COCO

    folder, _ = media
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="export images", label_config=config(IMAGE_CONFIG)).id
    label_studio.upload(pid, folder / "first.png")
    label_studio.upload(pid, folder / "second.png")
    tasks = sorted(t.id for t in sdk.tasks.list(project=pid))
    results, truth = image_results()
    wrong = [{**r, "value": {**r["value"], r["type"]: ["cat"]}} for r in results]
    sdk.annotations.create(id=tasks[0], result=wrong)  # the first annotation, superseded
    sdk.annotations.create(id=tasks[0], result=results)  # the latest: exported by default
    sdk.predictions.create(task=tasks[1], result=results[:2], model_version="other-model", score=0.5)

    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.personal_token())
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        status = main(["export", "--project", str(pid), "--out", str(tmp_path / "out")])
        first = main(
            [
                "export",
                "--project",
                str(pid),
                "--out",
                str(tmp_path / "first"),
                "--annotation",
                "first",
                "--format",
                "masks",
            ]
        )
    finally:
        get_settings.cache_clear()
    assert status == 0 and first == 0
    out = tmp_path / "out"
    stem = f"task-{tasks[0]}"
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{stem}.png"]  # task 2 has no annotation
    assert Image.open(out / "images" / f"{stem}.png").size == (W, H)

    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(LABELS)
    (image,) = coco.loadImgs(coco.getImgIds())
    assert image["file_name"] == f"images/{stem}.png" and (image["height"], image["width"]) == (H, W)
    annotations = coco.loadAnns(coco.getAnnIds())
    assert sorted(a["category_id"] for a in annotations) == [1, 2, 3]
    for annotation in annotations:
        assert np.array_equal(coco.annToMask(annotation).astype(bool), truth == annotation["category_id"])

    lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()  # Ultralytics: images/ -> labels/
    assert sorted(int(line.split()[0]) for line in lines) == [0, 1, 2]
    assert (out / "data.yaml").read_text().startswith("train: images\nval: images\n")

    (tmp_path / "gt").mkdir()
    Image.fromarray(truth).save(tmp_path / "gt" / f"{stem}.png")
    assert (
        main(
            [
                "eval",
                "masks",
                "--pred",
                str(out / "masks"),
                "--gt",
                str(tmp_path / "gt"),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "eval.json").read_text())["pred"]["miou"] == 1.0
    earlier = evaluate_folders(tmp_path / "first" / "masks", tmp_path / "gt")["pred"]
    assert earlier["iou"][1] < 1.0 and earlier["iou"][2] == 0.0  # the superseded annotation: all cats

    predicted = run_export(
        settings,
        ExportOptions(str(pid), tmp_path / "predicted", ("coco",), from_version="other-model", progress=False),
    )
    assert (predicted.exported, predicted.regions, predicted.errors) == (1, 2, [])
    coco = COCO(str(tmp_path / "predicted" / "coco.json"))
    assert sorted(a["category_id"] for a in coco.loadAnns(coco.getAnnIds())) == [2, 3]


def test_frame_sequence_exports_to_mot_davis_and_mots(label_studio, media, settings, tmp_path):
    import motmetrics as mm
    from pycocotools import mask as coco_mask

    _, host = media
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="export sequence", label_config=config(SEQUENCE_CONFIG)).id
    sdk.projects.import_tasks(id=pid, request=[{"frames": [f"{host.url}/frame{t}.png" for t in range(4)]}])
    (task,) = [t.id for t in sdk.tasks.list(project=pid)]
    results, truths = [], []
    for t in range(4):
        found, truth = image_results(item_index=t, shift=2 * t)
        results += [r for r in found if r["type"] != "rectanglelabels"]  # this config has no rectangles
        truth[truth == 2] = 0
        truths.append(truth)
    sdk.annotations.create(id=task, result=results)
    report = run_export(settings, ExportOptions(str(pid), tmp_path / "out", progress=False))
    assert (report.exported, report.tracks, report.errors) == (1, 2, [])
    out, name = tmp_path / "out", f"task-{task}"
    assert len(list((out / "images").glob(f"{name}_*.png"))) == 4

    frame = mm.io.loadtxt(str(out / "mot" / name / "gt" / "gt.txt"), fmt="mot15-2D", min_confidence=1)
    assert len(frame) == 8 and sorted(set(frame.index.get_level_values(1))) == [1, 2]
    cat = frame.xs(1, level=1) if frame.loc[(1, 1)]["ClassId"] == 1 else frame.xs(2, level=1)
    assert cat["X"].tolist() == [7.0, 9.0, 11.0, 13.0]  # the ring's box moves 2 px a frame, 0-based after loading

    gt = tmp_path / "gt" / name
    gt.mkdir(parents=True)
    for t, truth in enumerate(truths):
        indexed_png(truth).save(gt / f"{t:05d}.png")
    assert (
        main(
            [
                "eval",
                "video",
                "--pred",
                str(out / "davis"),
                "--gt",
                str(tmp_path / "gt"),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "eval.json").read_text())["summary"]["J&F-Mean"] == 1.0

    lines = (out / "mots" / f"{name}.txt").read_text().splitlines()
    assert len(lines) == 8
    for line in lines:
        t, object_id, cls, height, width, counts = line.split(" ")
        mask = coco_mask.decode({"size": [int(height), int(width)], "counts": counts.encode()}).astype(bool)
        assert np.array_equal(mask, truths[int(t)] == int(cls)) and int(object_id) // 1000 == int(cls)


def test_video_track_exports_frame_by_frame(label_studio, media, settings, tmp_path):
    import motmetrics as mm

    folder, _ = media
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="export video", label_config=config(VIDEO_CONFIG)).id
    label_studio.upload(pid, folder / "clip.mp4", "video/mp4")
    (task,) = [t.id for t in sdk.tasks.list(project=pid)]

    def key(frame: int, x: float, enabled: bool = True) -> dict:
        return {
            "frame": frame,
            "enabled": enabled,
            "x": x,
            "y": 25.0,
            "width": 25.0,
            "height": 50.0,
            "rotation": 0,
            "time": frame / 24,
        }

    value = {
        "labels": ["dog"],
        "framesCount": 12,
        "duration": 0.5,
        "sequence": [key(1, 0.0), key(5, 50.0, enabled=False), key(8, 25.0)],
    }
    sdk.annotations.create(
        id=task,
        result=[{"id": "t1", "from_name": "track", "to_name": "video", "type": "videorectangle", "value": value}],
    )
    report = run_export(settings, ExportOptions(str(pid), tmp_path / "out", progress=False))
    assert (report.exported, report.tracks, report.errors) == (1, 1, [])
    name = f"task-{task}"
    frame = mm.io.loadtxt(str(tmp_path / "out" / "mot" / name / "gt" / "gt.txt"), fmt="mot15-2D")
    frames = sorted(set(frame.index.get_level_values(0)))
    assert frames == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]  # 6 and 7: after the disabled keyframe
    # x moves 50 % of 96 px over frames 1-5: 12 px a frame; from frame 8 it holds at 25 % (24 px)
    assert [frame.loc[(f, 1)]["X"] for f in frames] == [0.0, 12.0, 24.0, 36.0, 48.0, 24.0, 24.0, 24.0, 24.0, 24.0]
    assert frame.loc[(3, 1)][["Y", "Width", "Height"]].tolist() == [16.0, 24.0, 32.0]
    davis = sorted((tmp_path / "out" / "davis" / name).iterdir())
    assert len(davis) == 12
    assert not np.asarray(Image.open(davis[5])).any() and (np.asarray(Image.open(davis[2])) == 1).sum() == 24 * 32
    assert not (tmp_path / "out" / "mots").exists()  # boxes only: no MOTS
