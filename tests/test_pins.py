"""Claims of the README pinned where no other test holds them: ``make test`` requires every service a
test may skip without, label configs with several controls and images, the heads folder rescanned
only when it changes, and ``usam bench-health``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.head import Head, HeadConfig, HeadNet
from usam_backend.cli import main
from usam_backend.labelstudio.config import ProjectLabel, parse_label_config
from usam_backend.registry import HeadRegistry

from helpers import ROOT


def unit_recipe() -> str:
    """The Makefile's ``unit`` recipe, its continued lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = re.search(r"^unit:[^\n]*\n((?:\t[^\n]*\n)+)", text, flags=re.MULTILINE)
    assert found, "the Makefile has no unit target"
    return found.group(1)


def test_make_test_sets_every_require_flag_the_tests_read():
    read = set()
    for source in (ROOT / "tests").glob("*.py"):
        read |= set(re.findall(r"\bUSAM_REQUIRE_[A-Z0-9_]+\b", source.read_text()))
    assert "USAM_REQUIRE_S3" in read
    recipe = unit_recipe()
    assert sorted(flag for flag in read if f"{flag}=1" not in recipe) == []


@pytest.mark.parametrize("missing", ["boto3", "moto"])
def test_required_s3_fails_without_moto_or_boto3(tmp_path, missing):
    """A Label Studio test on the S3 stand-in, with ``missing`` made unimportable: with
    USAM_REQUIRE_S3 it errors before any fixture (Label Studio is then not even looked for)."""
    (tmp_path / missing).mkdir()
    (tmp_path / missing / "__init__.py").write_text(f"raise ImportError('{missing} is not installed here')\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("USAM_REQUIRE_")}
    env.update(PYTHONPATH=str(tmp_path), USAM_REQUIRE_S3="1", USAM_TEST_LABEL_STUDIO=str(tmp_path / "no-such"))
    test = "tests/test_label_studio.py::test_retrieve_predictions_match_the_backends_masks"
    command = [sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider", "-q", "--durations=0", "-rA"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "1 error" in run.stdout, run.stdout[-3000:]
    assert f"{missing} is not installed here" in run.stdout and "skipped" not in run.stdout


BRUSHES = """<View>
  <Image name="left" value="$left"/>
  <Image name="right" value="$right"/>
  <BrushLabels name="organs" toName="left">
    <Label value="heart" predicted_values="cardiac"/><Label value="lung"/>
  </BrushLabels>
  <BrushLabels name="lesions" toName="left"><Label value="tumour"/><Label value="lung"/></BrushLabels>
  <BrushLabels name="plants" toName="right"><Label value="tree"/><Label value="lung"/></BrushLabels>
</View>"""


def test_several_brush_controls_and_images_map_each_label_to_its_control_and_image():
    config = parse_label_config(BRUSHES)
    assert set(config.labels) == {
        ProjectLabel("heart", "organs", "left", ("cardiac",)),
        ProjectLabel("lung", "organs", "left"),  # repeated on one image: the first control keeps it
        ProjectLabel("tumour", "lesions", "left"),
        ProjectLabel("tree", "plants", "right"),
        ProjectLabel("lung", "plants", "right"),  # the same value on another image is its own label
    }
    assert len(config.labels) == 5
    assert {name: field.key for name, field in config.images.items()} == {"left": "left", "right": "right"}
    assert [label.control for label in config.labels_for_image("right")] == ["plants", "plants"]
    assert config.brush_label("cardiac", "left") == ProjectLabel("heart", "organs", "left", ("cardiac",))
    assert config.brush_label("lung", "right") == ProjectLabel("lung", "plants", "right")
    assert config.brush_label("tumour", "right") is None


def save_head(path: Path, classes: tuple[str, ...], seed: int) -> Path:
    config = HeadConfig(input_dim=8, num_classes=len(classes), hidden=(4,))
    torch.manual_seed(seed)
    return Head(HeadNet(config), config, classes, {"sam_type": "tiny"}).save(path)


def test_heads_folder_is_rescanned_and_its_files_read_only_when_they_change(tmp_path, monkeypatch):
    """Head files read (descriptions and weights) and folder listings, counted across ``choose`` calls."""
    folder = tmp_path / "heads"
    save_head(folder / "a.pt", ("tomato", "sky"), 0)
    save_head(folder / "b.pt", ("cat",), 1)
    reads: list[str] = []
    listings: list[Path] = []
    real_load, real_glob = Head.load.__func__, Path.glob

    def counted_load(cls, path, **kwargs):
        reads.append(Path(path).name)
        return real_load(cls, path, **kwargs)

    def counted_glob(self, pattern, **kwargs):
        if self == folder:
            listings.append(self)
        return real_glob(self, pattern, **kwargs)

    monkeypatch.setattr(Head, "load", classmethod(counted_load))
    monkeypatch.setattr(Path, "glob", counted_glob)
    registry = HeadRegistry(folder, "tiny")
    labels = parse_label_config(
        '<View><Image name="image" value="$image"/>'
        '<BrushLabels name="tag" toName="image"><Label value="tomato"/></BrushLabels></View>'
    ).labels

    def bump_folder_time() -> None:  # a change of the folder, whatever the clock's resolution
        stat = folder.stat()
        os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert registry.choose(labels).path.name == "a.pt"
    assert sorted(reads) == ["a.pt", "a.pt", "b.pt"] and len(listings) == 1  # two descriptions, one head's weights
    for _ in range(3):
        assert registry.choose(labels).path.name == "a.pt"
        assert registry.infos() and registry.versions()
    assert len(reads) == 3 and len(listings) == 1  # nothing changed: no listing, no read

    bump_folder_time()
    assert registry.choose(labels).path.name == "a.pt"
    assert len(reads) == 3 and len(listings) == 2  # listed again; no file changed, none read

    save_head(folder / "c.pt", ("dog",), 2)
    bump_folder_time()
    assert registry.choose(labels).path.name == "a.pt" and len(registry.infos()) == 3
    assert reads[3:] == ["c.pt"] and len(listings) == 3  # only the new file is read


def test_bench_health_runs_and_prints_its_figures(capsys):
    assert main(["bench-health", "--heads", "12", "--projects", "3"]) == 0
    out = capsys.readouterr().out
    assert "12 head files (10 project heads), 3 projects" in out
    first = re.search(r"/health, first call \(reads every head file once\): (\d+) ms", out)
    median = re.search(r"/health, median of 20: (\d+\.\d) ms \((\d+)% of the 100 ms budget\)", out)
    assert first and median, out
    assert float(median.group(1)) > 0 and "heads listed 12, projects 3" in out
