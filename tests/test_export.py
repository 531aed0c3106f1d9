"""usam export's formats, read back by the field's own readers: pycocotools (COCO), Ultralytics' layout
(YOLO segmentation), motmetrics (MOT), usam eval masks / usam eval video (label maps, DAVIS) and
pycocotools again for MOTS' RLE. Regions start as Label Studio results made from known masks, so each
round trip compares an export with the masks it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from usam_backend.cli import main
from usam_backend.core.masks import brush_rle
from usam_backend.core.shapes import polygons_mask
from usam_backend.labelstudio.annotations import read_results
from usam_backend.tools.export import (
    CocoDocument,
    ImageItem,
    SequenceItem,
    Track,
    choose_result,
    link_regions,
    write_items,
    write_outputs,
)
from usam_backend.tools.video_files import indexed_png

H, W = 48, 64
CLASSES = ("cat", "dog", "bird")


def _brush(mask: np.ndarray, label: str, frame: int = 0, rid: str = "") -> dict:
    return {
        "id": rid or f"b{frame}{label}",
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "item_index": frame,
        "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]},
    }


def _rect(x0: int, y0: int, x1: int, y1: int, label: str) -> dict:
    value = {
        "x": 100 * x0 / W,
        "y": 100 * y0 / H,
        "width": 100 * (x1 - x0) / W,
        "height": 100 * (y1 - y0) / H,
        "rotation": 0,
        "rectanglelabels": [label],
    }
    return {"id": f"r{label}", "type": "rectanglelabels", "to_name": "image", "value": value}


def _scene() -> tuple[list[dict], np.ndarray]:
    """Label Studio results of one image (a brush with a hole, a rectangle, a polygon) and the
    label map they should give (class index + 1)."""
    yy, xx = np.mgrid[0:H, 0:W]
    ring = ((xx - 16) ** 2 + (yy - 16) ** 2 < 12**2) & ~((xx - 16) ** 2 + (yy - 16) ** 2 < 4**2)
    truth = np.zeros((H, W), dtype=np.int32)
    truth[ring] = 1
    truth[30:44, 40:60] = 2  # the rectangle: pixel edges, exact
    triangle = np.array([[36.0, 4.0], [60.0, 4.0], [60.0, 24.0]])
    tri_mask = polygons_mask([triangle], H, W)
    truth[tri_mask] = 3
    polygon = {
        "id": "p",
        "type": "polygonlabels",
        "to_name": "image",
        "value": {"points": (triangle / [W, H] * 100).tolist(), "closed": True, "polygonlabels": ["bird"]},
    }
    return [_brush(ring, "cat"), _rect(40, 30, 60, 44, "dog"), polygon], truth


def _image_item(stem: str = "task-1") -> tuple[ImageItem, np.ndarray]:
    results, truth = _scene()
    read = read_results(results, task=1, size=lambda name, frame: (H, W))
    assert not read.errors
    return ImageItem(stem, f"images/{stem}.png", H, W, 1, read.regions), truth


def test_coco_file_loads_and_decodes_with_pycocotools(tmp_path) -> None:
    from pycocotools.coco import COCO

    item, truth = _image_item()
    write_outputs(tmp_path, ("coco",), CLASSES, [item], [])
    coco = COCO(str(tmp_path / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    (image,) = coco.loadImgs(coco.getImgIds())
    assert (image["file_name"], image["height"], image["width"]) == ("images/task-1.png", H, W)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
    assert len(annotations) == 3
    for annotation in annotations:
        mask = coco.annToMask(annotation).astype(bool)
        assert np.array_equal(mask, truth == annotation["category_id"])
        assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0
    dog = next(a for a in annotations if a["category_id"] == 2)
    assert dog["bbox"] == [40.0, 30.0, 20.0, 14.0]


def test_yolo_segmentation_follows_ultralytics_layout(tmp_path) -> None:
    import yaml

    item, truth = _image_item()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "task-1.png")
    write_outputs(tmp_path, ("yolo",), CLASSES, [item], [])
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert data["train"] == data["val"] == "images" and data["names"] == dict(enumerate(CLASSES))
    assert data["nc"] == 3 and (tmp_path / "classes.txt").read_text().split() == list(CLASSES)
    # Ultralytics finds an image's labels by replacing /images/ with /labels/ and the suffix with .txt
    for image in (tmp_path / "images").iterdir():
        label_file = tmp_path / "labels" / f"{image.stem}.txt"
        assert label_file.is_file()
    drawn = np.zeros((H, W), dtype=np.int32)
    lines = (tmp_path / "labels" / "task-1.txt").read_text().splitlines()
    for line in lines:
        cls, *coords = line.split()
        values = np.array(coords, dtype=float)
        assert len(values) % 2 == 0 and len(values) >= 6 and ((values >= 0) & (values <= 1)).all()
        drawn[polygons_mask([values.reshape(-1, 2) * [W, H]], H, W)] = int(cls) + 1
    assert sorted(int(line.split()[0]) for line in lines) == [0, 1, 2]
    for cls in (1, 2, 3):
        both, either = ((drawn == cls) & (truth == cls)).sum(), ((drawn == cls) | (truth == cls)).sum()
        assert both / either >= 0.95, (cls, both / either)


def test_label_maps_round_trip_through_usam_eval_masks(tmp_path) -> None:
    item, truth = _image_item()
    write_outputs(tmp_path / "out", ("masks",), CLASSES, [item], [])
    (tmp_path / "gt").mkdir()
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "gt" / "task-1.png")
    with Image.open(tmp_path / "out" / "masks" / "task-1.png") as written:
        assert written.mode == "P"
    assert (
        main(
            [
                "eval",
                "masks",
                "--pred",
                str(tmp_path / "out" / "masks"),
                "--gt",
                str(tmp_path / "gt"),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["pred"]["miou"] == 1.0 and result["pred"]["images"] == 1


def test_already_written_files_are_kept(tmp_path) -> None:
    item, _ = _image_item()
    first = write_outputs(tmp_path, ("masks", "yolo", "coco"), CLASSES, [item], [])
    assert first == {"coco": 1, "yolo": 3, "masks": 1}
    again = write_outputs(tmp_path, ("masks", "yolo", "coco"), CLASSES, [item], [])
    assert again == {"coco": 1, "yolo": 2}  # the per-image files stay; the lists are rewritten
    rewritten = write_items(tmp_path, ("masks", "yolo"), CLASSES, [item], [], CocoDocument(CLASSES), overwrite=True)
    assert rewritten == {"yolo": 1, "masks": 1}


# --- sequences and videos -------------------------------------------------------------------------


def _moving(frames: int = 4) -> tuple[list[dict], np.ndarray]:
    """Two cats crossing a frame sequence and a dog appearing on frame 2: brush results per frame
    (ids new on every frame, as Label Studio's are) and the true (T, H, W) id maps."""
    results, truth = [], np.zeros((frames, H, W), dtype=np.uint8)
    for t in range(frames):
        for number, (x, y) in enumerate([(4 + 4 * t, 6), (40 - 4 * t, 28)], start=1):
            mask = np.zeros((H, W), dtype=bool)
            mask[y : y + 12, x : x + 14] = True
            truth[t][mask] = number
            results.append(_brush(mask, "cat", t, rid=f"c{number}-{t}"))
        if t >= 2:
            mask = np.zeros((H, W), dtype=bool)
            mask[40:46, 50:60] = True
            truth[t][mask] = 3
            results.append(_brush(mask, "dog", t, rid=f"d-{t}"))
    return results, truth


def _sequence() -> tuple[SequenceItem, np.ndarray]:
    results, truth = _moving()
    read = read_results(results, task=5, size=lambda name, frame: (H, W))
    sequence = SequenceItem("task-5", H, W, len(truth), 5, link_regions(read.regions))
    return sequence, truth


def test_sequence_regions_link_into_tracks() -> None:
    sequence, truth = _sequence()
    assert [(t.number, t.label, sorted(t.boxes)) for t in sequence.tracks] == [
        (1, "cat", [0, 1, 2, 3]),
        (2, "cat", [0, 1, 2, 3]),
        (3, "dog", [2, 3]),
    ]
    for track in sequence.tracks:
        for frame, mask in track.masks.items():
            assert np.array_equal(mask, truth[frame] == track.number)


def test_a_region_that_jumps_starts_a_new_track() -> None:
    results, _ = _moving(2)
    jumped = np.zeros((H, W), dtype=bool)
    jumped[30:42, 2:16] = True  # frame 2's first cat, far from where it was
    results.append(_brush(jumped, "cat", 2, rid="far"))
    read = read_results(results, task=5, size=lambda name, frame: (H, W))
    tracks = link_regions(read.regions)
    assert [sorted(t.boxes) for t in tracks] == [[0, 1], [0, 1], [2]]


def test_mot_text_parses_with_motmetrics_and_scores_itself_perfectly(tmp_path) -> None:
    import motmetrics as mm

    sequence, _ = _sequence()
    write_outputs(tmp_path, ("mot",), CLASSES, [], [sequence])
    path = tmp_path / "mot" / "task-5" / "gt" / "gt.txt"
    frame = mm.io.loadtxt(str(path), fmt="mot15-2D", min_confidence=1)
    assert len(frame) == 4 + 4 + 2
    row = frame.loc[(1, 2)]  # frame 1 (1-based), track 2: the second cat at (40, 28), 14 x 12
    assert (row["X"], row["Y"], row["Width"], row["Height"]) == (40.0, 28.0, 14.0, 12.0)
    assert frame.loc[(3, 3)]["ClassId"] == 2  # the dog: class index 1, 1-based
    # motmetrics 1.4's iou_matrix needs NumPy < 2: its own boxiou and accumulator do the same
    accumulator = mm.MOTAccumulator()
    for number, rows in frame.groupby(level=0):
        ids = rows.index.get_level_values(1).tolist()
        boxes = rows[["X", "Y", "Width", "Height"]].to_numpy()
        distances = np.array([[1 - mm.distances.boxiou(a, b) for b in boxes] for a in boxes])
        accumulator.update(ids, ids, np.where(distances <= 0.5, distances, np.nan), frameid=number)
    summary = mm.metrics.create().compute(accumulator, metrics=["mota", "num_switches", "num_objects"])
    assert summary["num_objects"].iloc[0] == 10
    assert summary["mota"].iloc[0] == 1.0 and summary["num_switches"].iloc[0] == 0
    assert "task-5" in (tmp_path / "mot" / "seqmap.txt").read_text().split()
    assert "seqLength=4" in (tmp_path / "mot" / "task-5" / "seqinfo.ini").read_text()


def test_davis_pngs_score_one_with_usam_eval_video(tmp_path) -> None:
    sequence, truth = _sequence()
    write_outputs(tmp_path / "out", ("davis",), CLASSES, [], [sequence])
    for t, ids in enumerate(truth):
        path = tmp_path / "gt" / "task-5" / f"{t:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        indexed_png(ids).save(path)
    assert (
        main(
            [
                "eval",
                "video",
                "--pred",
                str(tmp_path / "out" / "davis"),
                "--gt",
                str(tmp_path / "gt"),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["summary"]["J&F-Mean"] == 1.0 and len(report["sequences"][0]["objects"]) == 3


def test_mots_text_decodes_with_pycocotools(tmp_path) -> None:
    from pycocotools import mask as coco_mask

    sequence, truth = _sequence()
    write_outputs(tmp_path, ("mots",), CLASSES, [], [sequence])
    lines = (tmp_path / "mots" / "task-5.txt").read_text().splitlines()
    assert len(lines) == 10
    for line in lines:
        frame, object_id, cls, height, width, counts = line.split(" ")
        mask = coco_mask.decode({"size": [int(height), int(width)], "counts": counts.encode()}).astype(bool)
        number = int(object_id) % 1000
        assert int(object_id) // 1000 == int(cls) == (2 if number == 3 else 1)
        assert np.array_equal(mask, truth[int(frame)] == number)


def test_video_tracks_give_mot_and_filled_box_davis_but_no_mots(tmp_path) -> None:
    keys = [
        {"frame": 1, "enabled": True, "x": 0, "y": 0, "width": 25, "height": 25, "rotation": 0},
        {"frame": 3, "enabled": False, "x": 50, "y": 50, "width": 25, "height": 25, "rotation": 0},
    ]
    result = {
        "id": "v",
        "type": "videorectangle",
        "to_name": "video",
        "value": {"labels": ["dog"], "framesCount": 5, "duration": 0.2, "sequence": keys},
    }
    read = read_results([result], task=9, size=lambda name, frame: (H, W))
    (video_track,) = read.tracks
    track = Track(1, "dog", {f - 1: b for f, b in video_track.boxes.items()})
    track.masks = dict.fromkeys(track.boxes)
    sequence = SequenceItem("task-9", H, W, 5, 9, [track])
    written = write_outputs(tmp_path, ("mot", "davis", "mots"), CLASSES, [], [sequence])
    assert "mots" not in written and written["davis"] == 5
    lines = (tmp_path / "mot" / "task-9" / "gt" / "gt.txt").read_text().splitlines()
    # frame 2 halfway from (0, 0) to (50 %, 50 %): (16, 12) px; frame 3, disabled, still drawn; 1-based pixels
    assert lines == [
        "1,1,1.00,1.00,16.00,12.00,1,2,1",
        "2,1,17.00,13.00,16.00,12.00,1,2,1",
        "3,1,33.00,25.00,16.00,12.00,1,2,1",
    ]
    with Image.open(tmp_path / "davis" / "task-9" / "00001.png") as png:
        ids = np.asarray(png)
    assert png.mode == "P" and (ids == 1).sum() == 16 * 12 and ids[12:24, 16:32].all()
    with Image.open(tmp_path / "davis" / "task-9" / "00003.png") as png:
        assert not np.asarray(png).any()  # after the disabled keyframe


# --- which result a task exports ------------------------------------------------------------------


def _task() -> dict:
    return {
        "id": 1,
        "annotations": [
            {"id": 10, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-05T00:00:00Z", "result": ["a"]},
            {
                "id": 11,
                "created_at": "2026-01-02T00:00:00Z",
                "updated_at": "2026-01-03T00:00:00Z",
                "result": ["b"],
                "ground_truth": True,
            },
            {"id": 12, "created_at": "2026-01-09T00:00:00Z", "was_cancelled": True, "result": ["skipped"]},
        ],
        "predictions": [{"model_version": "v1", "result": ["p1"]}, {"model_version": "v2", "result": ["p2"]}],
    }


@pytest.mark.parametrize(("rule", "expected"), [("latest", ["a"]), ("first", ["a"]), ("ground-truth", ["b"])])
def test_annotation_rules(rule, expected) -> None:
    assert choose_result(_task(), from_version=None, rule=rule) == expected


def test_latest_and_first_differ_when_the_first_was_not_updated_last() -> None:
    task = _task()
    task["annotations"][0]["updated_at"] = "2026-01-01T00:00:00Z"
    assert choose_result(task, from_version=None, rule="latest") == ["b"]
    assert choose_result(task, from_version=None, rule="first") == ["a"]


def test_predictions_of_one_version_and_tasks_without_one() -> None:
    assert choose_result(_task(), from_version="v2") == ["p2"]
    assert choose_result(_task(), from_version="v3") is None
    assert choose_result({"annotations": [{"was_cancelled": True, "result": []}]}, from_version=None) is None


# --- a task's media and regions -------------------------------------------------------------------


def test_a_task_exports_what_it_can_and_names_what_it_cannot(tmp_path) -> None:
    import httpx

    from usam_backend.core.settings import Settings
    from usam_backend.labelstudio.annotations import ProjectSchema
    from usam_backend.labelstudio.media import fetcher_for
    from usam_backend.tools.export import ExportOptions, TaskMedia, collect_task

    from helpers import WebHost

    (tmp_path / "web").mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "web" / "a.png")
    host = WebHost(tmp_path / "web")
    settings = Settings(allowed_hosts=("127.0.0.1",), cache_dir=tmp_path / "cache")
    schema = ProjectSchema.read(
        '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
        '<Label value="cat"/><Label value="dog"/><Label value="bird"/></RectangleLabels></View>'
    )
    bad_polygon = {"id": "bad", "type": "polygonlabels", "to_name": "image", "value": {"points": [[1, 1]]}}
    unknown = {**_rect(0, 0, 8, 8, "cow"), "id": "cow"}
    results = [_rect(40, 30, 60, 44, "dog"), bad_polygon, unknown]
    options = ExportOptions("1", tmp_path / "out")
    try:
        with httpx.Client(follow_redirects=False) as client:
            fetcher = fetcher_for(settings, None, client)
            media = TaskMedia(tmp_path / "out", settings, fetcher, fetcher)
            task = {"id": 3, "data": {"image": f"{host.url}/a.png"}}
            images, _, errors = collect_task(task, results, schema, media, options)
            assert [(i.file, i.height, i.width) for i in images] == [("images/task-3.png", H, W)]
            assert [r.label for r in images[0].regions] == ["dog"]
            assert (
                len(errors) == 2
                and "task 3, region bad" in errors[0]
                and "'cow' is not in the label config" in errors[1]
            )
            fetched = len(host.requests)
            collect_task(task, results, schema, media, options)  # a second run reads the stored image
            assert len(host.requests) == fetched == 1
            again = TaskMedia(tmp_path / "out", settings, fetcher, fetcher, overwrite=True)
            collect_task(task, results, schema, again, options)
            assert len(host.requests) == 2
            missing = {"id": 4, "data": {"image": f"{host.url}/gone.png"}}
            images, _, errors = collect_task(missing, results, schema, media, options)
            assert images == [] and errors[0].startswith("task 4, image:") and "404" in errors[0]
    finally:
        host.stop()


def test_the_command_refuses_bad_input_in_one_line(tmp_path, monkeypatch, isolated_settings, capsys) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    assert main(["export", "--project", "1", "--out", str(tmp_path), "--format", "coco,shapefile"]) == 2
    assert "unknown export format(s) shapefile" in capsys.readouterr().err
    assert main(["export", "--project", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "usam: error: Label Studio's URL is unknown: set LABEL_STUDIO_URL"
