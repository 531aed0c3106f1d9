"""The ``usam`` command line: train, predict, bench, and what bad input does to each."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import Head
from usam_backend.cli import main
from usam_backend.core.masks import rle_to_mask

from conftest import write_class_folders
from helpers import TINY

pytestmark = pytest.mark.usefixtures("isolated_settings")


@pytest.fixture(scope="module")
def small_classes(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("cli-classes"), per_class=3, size=64)


@pytest.fixture(scope="module")
def trained_head_path(tmp_path_factory, small_classes) -> Path:
    path = tmp_path_factory.mktemp("head") / "head.pt"
    assert main(["train", "--data", str(small_classes), "--out", str(path), "--epochs", "2", "--no-cache", *TINY]) == 0
    return path


def test_train_predict_round_trip(tmp_path, small_classes, capsys):
    head_path = tmp_path / "heads" / "head.pt"
    assert main(["train", "--data", str(small_classes), "--out", str(head_path), "--epochs", "3", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "image-level accuracy" in printed and "random SAM weights" in printed
    head = Head.load(head_path)
    assert head.class_names == ("sky", "tomato")
    assert head.info["sam_type"] == "tiny" and head.info["points"] == 16 and head.info["random_weights"]
    assert head.info["provenance"]["classes"]["sky"]["images"] == 3
    assert (tmp_path / "cache" / "bags").is_dir()  # embeddings were cached

    image_path = small_classes / "sky" / "000.png"
    out = tmp_path / "pred"
    assert main(["predict", "--head", str(head_path), str(image_path), "--out", str(out), "--viz", *TINY]) == 0
    document = json.loads((out / "000.json").read_text())
    assert document["model"]["head_version"] == head.version and document["model"]["random_weights"]
    assert "not from a real model" in document["warning"]
    label_map = np.asarray(Image.open(out / "000.labels.png"))
    assert label_map.shape == (64, 64)
    for region in document["regions"]:
        mask = rle_to_mask(region["mask_rle"])
        assert mask.sum() == region["area"]
        assert document["label_map_values"][str(region["class_id"] + 1)] == region["label"]
    assert Image.open(out / "000.overlay.png").size == (64, 64)


def test_predict_skips_bad_images_and_writes_the_rest(tmp_path, small_classes, capsys, trained_head_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    good = small_classes / "tomato" / "001.png"
    out = tmp_path / "pred"
    code = main(["predict", "--head", str(trained_head_path), str(broken), str(good), "--out", str(out), *TINY])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.png is not a readable image" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["001.json", "001.labels.png"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "has no class folders"),
        ({"cat": [], "dog": ["a.png"]}, "hold no images"),
        ({"cat": ["a.png"]}, "has one class only"),
        ({"cat": ["notes.txt"], "dog": ["a.png"]}, "hold no images"),
    ],
)
def test_train_refuses_bad_data_folders(tmp_path, capsys, layout, message):
    data = tmp_path / "data"
    data.mkdir()
    for name, files in layout.items():
        (data / name).mkdir()
        for file in files:
            target = data / name / file
            if file.endswith(".png"):
                Image.new("RGB", (32, 32), (200, 10, 10)).save(target)
            else:
                target.write_text("not an image")
    out = tmp_path / "head.pt"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_train_skips_corrupt_images_but_needs_one_per_class(tmp_path, capsys):
    data = write_class_folders(tmp_path / "data", per_class=2, size=48)
    (data / "sky" / "zz-corrupt.jpg").write_bytes(b"garbage")
    out = tmp_path / "head.pt"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", *TINY]) == 0
    assert "zz-corrupt.jpg" in capsys.readouterr().err
    skipped = Head.load(out).info["provenance"]["skipped"]
    assert [Path(s["file"]).name for s in skipped] == ["zz-corrupt.jpg"]

    for image in (data / "tomato").iterdir():
        image.write_bytes(b"garbage")
    out2 = tmp_path / "head2.pt"
    assert main(["train", "--data", str(data), "--out", str(out2), *TINY]) == 2
    assert "no readable image for class(es) ['tomato']" in capsys.readouterr().err
    assert not out2.exists()


def test_predict_with_a_missing_head(tmp_path, capsys):
    assert main(["predict", "--head", str(tmp_path / "none.pt"), "x.png", "--out", str(tmp_path), *TINY]) == 2
    assert "no head artifact" in capsys.readouterr().err


def test_bench_reports_both_paths(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "--size", "256", "--json", str(report), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "naive / ours" in printed and "outputs agree" in printed
    numbers = json.loads(report.read_text())
    assert numbers["random_weights"] and numbers["agreement"]["agree"]
    assert numbers["ratio_naive_over_ours"] == pytest.approx(numbers["naive"]["total"] / numbers["ours"]["total"])
    assert set(numbers["ours"]["seconds"]) == {"encode", "decode", "head", "masks", "nms"}


def test_console_script_help_and_errors(tmp_path):
    for args in (["--help"], ["train", "--help"], ["predict", "--help"], ["bench", "--help"]):
        done = subprocess.run([sys.executable, "-m", "usam_backend.cli", *args], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: usam" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "usam_backend.cli", "train", "--data", str(tmp_path / "no"), "--out", "h.pt"],
        capture_output=True,
        text=True,
        env={"USAM_POINTS": "7", "PATH": "/usr/bin"},
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "usam: error: USAM_POINTS=7 is not valid: expected a perfect square such as 4 or 9"


def test_bench_predict_times_first_and_cached_calls(capsys):
    assert main(["bench-predict", "--size", "256", "--repeat", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "first call" in printed and "cached embedding" in printed and "random weights" in printed


def test_preannotate_names_what_is_missing(tmp_path, monkeypatch, capsys):
    from usam_backend.core import settings as settings_module

    monkeypatch.setenv("USAM_MODEL_DIR", str(tmp_path))
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    settings_module.get_settings.cache_clear()
    assert main(["preannotate", "--project", "3"]) == 2
    assert "set LABEL_STUDIO_URL" in capsys.readouterr().err
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
    settings_module.get_settings.cache_clear()
    assert main(["preannotate", "--project", "3"]) == 2
    assert "Label Studio at http://127.0.0.1:1 is unreachable" in capsys.readouterr().err
    settings_module.get_settings.cache_clear()
