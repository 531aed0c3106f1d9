"""``usam video`` and ``usam eval video`` on real mp4 files and frame folders, with the tiny SAM;
tracks files (UVOSAM JSON, usam's tracks.json, MOT text) and what bad ones get."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from video_scenes import moving_shapes

from usam_backend.cli import main
from usam_backend.core.errors import DataError
from usam_backend.core.masks import rle_to_mask
from usam_backend.core.video import read_clip, write_video
from usam_backend.tools.video_files import indexed_png, read_tracks

from helpers import TINY

pytestmark = pytest.mark.usefixtures("isolated_settings")


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "shapes.mp4", moving_shapes(8).frames, 24)


def uvosam_tracks(path: Path, video: str = "shapes", frames: int = 8) -> Path:
    """UVOSAM's tracks JSON from the true boxes: object 3 leaves after frame 5 (null boxes)."""
    scene = moving_shapes(frames)
    items = []
    for k in (1, 2, 3):
        boxes = [scene.boxes(t).get(k) for t in range(frames)]
        boxes = [None if b is None or (k == 3 and t > 5) else b.tolist() for t, b in enumerate(boxes)]
        items.append({"video_id": video, "score": 0.9, "category_id": k % 2, "boxes": boxes})
    items.append({"video_id": "other", "score": 0.5, "category_id": 1, "boxes": [[0, 0, 5, 5]] * frames})
    path.write_text(json.dumps(items))
    return path


def test_video_from_a_tracks_file_writes_pngs_json_and_a_viz_and_resumes(tmp_path, clip_path, capsys):
    tracks = uvosam_tracks(tmp_path / "tracks.json")
    out = tmp_path / "out"
    args = ["video", str(clip_path), "--out", str(out), "--tracks", str(tracks), "--viz", *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 track(s)" in printed and "8 frame(s) segmented" in printed
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(8)]
    with Image.open(pngs[0]) as first:
        assert first.mode == "P" and first.size == (128, 96)
        assert set(np.unique(np.asarray(first))) <= {0, 1, 2, 3}
    document = json.loads((out / "tracks.json").read_text())
    assert document["format"] == "usam-video-tracks/1"
    assert document["video"] == {"name": "shapes.mp4", "fps": 24.0, "frame_count": 8, "width": 128, "height": 96}
    assert [t["id"] for t in document["tracks"]] == [1, 2, 3]
    third = document["tracks"][2]
    assert [f["frame"] for f in third["frames"]] == [0, 1, 2, 3, 4, 5]  # null boxes: no frame
    for entry in third["frames"]:
        with Image.open(out / f"{entry['frame']:05d}.png") as png:
            assert np.array_equal(rle_to_mask(entry["rle"]), np.asarray(png) == 3)
    viz = read_clip(out / "viz.mp4")
    assert len(viz) == 8 and viz.fps == 24.0
    assert not (out / "tracks-boxes.json").exists()

    assert main(args) == 0  # resumes: nothing to segment again
    assert "0 frame(s) segmented, 8 already there" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    assert "8 frame(s) segmented" in capsys.readouterr().out
    # usam's own tracks.json is a tracks file too
    assert main(["video", str(clip_path), "--out", str(tmp_path / "again"), "--tracks", str(out / "tracks.json"),
                 *TINY]) == 0  # fmt: skip
    assert "3 track(s)" in capsys.readouterr().out


def test_video_with_a_head_on_a_frame_folder(tmp_path, capsys):
    from conftest import write_class_folders

    classes = write_class_folders(tmp_path / "classes", per_class=3, size=64)
    head = tmp_path / "head.pt"
    assert main(["train", "--data", str(classes), "--out", str(head), "--epochs", "2", "--no-cache", *TINY]) == 0
    folder = tmp_path / "JPEGImages" / "shapes"
    folder.mkdir(parents=True)
    for t, frame in enumerate(moving_shapes(6).frames):
        Image.fromarray(frame).save(folder / f"{5 * t:05d}.jpg")  # a strided frame folder (YouTube-VOS style)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["video", str(folder), "--out", str(out), "--head", str(head), "--stride", "2", "--fps", "12",
                 "--viz", "gif", *TINY]) == 0  # fmt: skip
    document = json.loads((out / "tracks.json").read_text())
    assert document["video"]["fps"] == 12.0 and document["video"]["frame_count"] == 6
    assert all(t["label"] in ("sky", "tomato") for t in document["tracks"])  # random weights: any number of tracks
    assert sorted(p.stem for p in out.glob("*.png")) == [f"{5 * t:05d}" for t in range(6)]  # the folder's names
    assert (out / "viz.gif").stat().st_size > 0


def test_eval_video_matches_objects_and_writes_json(tmp_path, capsys):
    scene = moving_shapes(10)
    gt, good, bad = tmp_path / "gt" / "shapes", tmp_path / "good" / "shapes", tmp_path / "bad" / "shapes"
    for folder in (gt, good, bad):
        folder.mkdir(parents=True)
    for t, ids in enumerate(scene.objects):
        indexed_png(ids).save(gt / f"{t:05d}.png")
        indexed_png(np.choose(ids, [0, 3, 1, 2])).save(good / f"{t:05d}.png")  # other ids, same objects
        shifted = np.roll(ids, 6, axis=1)
        if t % 2:
            shifted[shifted == 1] = 0  # object 1 missed on odd frames
        indexed_png(shifted).save(bad / f"{t:05d}.png")
    assert main(["eval", "video", "--pred", str(tmp_path / "good"), "--gt", str(tmp_path / "gt"),
                 "--json", str(tmp_path / "good.json")]) == 0  # fmt: skip
    assert "1.000" in capsys.readouterr().out
    good_report = json.loads((tmp_path / "good.json").read_text())
    assert good_report["summary"]["J&F-Mean"] == 1.0
    assert [o["prediction"] for o in good_report["sequences"][0]["objects"]] == [3, 1, 2]
    assert main(["eval", "video", "--pred", str(bad), "--gt", str(gt), "--json", str(tmp_path / "bad.json")]) == 0
    summary = json.loads((tmp_path / "bad.json").read_text())["summary"]
    assert 0.2 < summary["J&F-Mean"] < 0.9 and summary["J-Recall"] < 1.0
    assert main(["eval", "video", "--pred", str(tmp_path / "nothing"), "--gt", str(gt)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_tracks_files_mot_and_bad_ones(tmp_path, clip_path, capsys):
    mot = tmp_path / "tracks.txt"
    mot.write_text("1,7,10,20,30,40,0.9,-1,-1,-1\n2,7,12,20,30,40,0.8,-1,-1,-1\n1,3,50,50,10,10,1,-1,-1,-1\n")
    tracks = read_tracks(mot)
    assert list(tracks) == [3, 7] and tracks[7].boxes[1].tolist() == [11, 19, 41, 59]  # 1-based frames and pixels
    assert tracks[7].scores == {0: 0.9, 1: 0.8}
    mot.write_text("1,700,10,20,30,40,0.9\n1,3,50,50,10,10,1\n")
    assert list(read_tracks(mot)) == [1, 2]  # ids beyond a palette are renumbered
    both = uvosam_tracks(tmp_path / "both.json")
    with pytest.raises(DataError, match="2 videos"):
        read_tracks(both)
    assert len(read_tracks(both, video="other")) == 1
    with pytest.raises(DataError, match="outside the clip"):
        read_tracks(both, video="shapes", frame_count=4)
    cases = {
        "garbage.json": ("{not json", "not valid JSON"),
        "noid.json": ('{"format": "usam-video-tracks/1", "tracks": [{"frames": []}]}', "lacks a field"),
        "bigid.json": ('{"format": "usam-video-tracks/1", "tracks": [{"id": 300, "frames": []}]}', "1-255"),
        "shape.json": ('[{"video_id": "v", "boxes": [[1, 2, 3]]}]', "not a box"),
        "inverted.json": ('[{"video_id": "v", "boxes": [[30, 30, 10, 10]]}]', "not an xyxy box"),
        "dict.json": ('{"tracks": 3}', "format"),
        "mot.txt": ("1,2,three,4\n", "MOT lines"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            read_tracks(tmp_path / name)
    out = str(tmp_path / "out")
    assert main(["video", str(clip_path), "--out", out, "--tracks", str(tmp_path / "inverted.json"), *TINY]) == 2
    assert "not an xyxy box" in capsys.readouterr().err
    assert main(["video", str(tmp_path / "missing.mp4"), "--out", out, "--tracks", str(mot), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 1000)
    assert main(["video", str(tmp_path / "broken.mp4"), "--out", out, "--tracks", str(mot), *TINY]) == 2
    assert "could not be decoded" in capsys.readouterr().err


def test_bench_video_prints_stages_and_frames_per_second(capsys):
    assert main(["bench-video", "--frames", "9", "--size", "128", "--stride", "3", "--objects", "2", *TINY]) == 0
    out = capsys.readouterr().out
    for stage in ("decode (PyAV)", "head on strided frames", "tracking (linking)", "usam video one pass"):
        assert stage in out
    assert "frames/s of video" in out
    assert int(re.search(r"; (\d+) tracks linked", out).group(1)) >= 1
    assert re.search(r"masks \(usam video --head\): +[\d.]+ frames/s of video; encoder passes per frame 1.00", out)
    assert re.search(r"the encoder \d+ % of making the masks", out)
    assert re.search(r"--box with 2 objects followed together: [\d.]+ frames/s; encoder passes per frame 1.00", out)


def test_video_from_keyframe_boxes(tmp_path, clip_path, capsys):
    out = tmp_path / "out"
    args = ["video", str(clip_path), "--out", str(out), "--box", "2:20,30,80,90:disc", "--box", "0:90,30,125,60", *TINY]
    assert main(args) == 0
    document = json.loads((out / "tracks.json").read_text())
    assert [(t["id"], t["label"]) for t in document["tracks"]] == [(1, "disc"), (2, "")]  # in --box order
    for track in document["tracks"]:  # the tiny random SAM: followed as far as its masks allow
        assert all(0 <= f["frame"] < 8 and f["rle"]["size"] == [96, 128] for f in track["frames"])
    assert len(list(out.glob("*.png"))) == 8
    for bad, message in (("2:20,30,80", "expected FRAME:X0,Y0,X1,Y1"), ("2:80,30,20,90", "x0 < x1"),
                         ("99:20,30,80,90", "the clip has frames 0-7")):  # fmt: skip
        assert main(["video", str(clip_path), "--out", str(tmp_path / "bad"), "--box", bad, *TINY]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one source only
        main(["video", str(clip_path), "--out", str(out), "--box", "0:1,1,5,5", "--tracks", "x.json", *TINY])
