"""Training jobs in-process: the five stages, resuming, publishing, and the embedded runner."""

import pytest

from training import Head
from training.jobs import TrainRequest, job_id, train_labels
from usam_backend.backend import Backend
from usam_backend.label_config import parse_label_config
from usam_backend.registry import HeadRegistry, no_head_version
from usam_backend.runners import EmbeddedRunner
from usam_backend.settings import Settings

from conftest import write_class_folders

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
{labels}</BrushLabels></View>"""


def config_for(*labels: str) -> str:
    return CONFIG.format(labels="".join(f'<Label value="{label}"/>' for label in labels))


@pytest.fixture
def job_settings(tmp_path):
    data = write_class_folders(tmp_path / "data", per_class=4, size=48, names=("tomato", "sky", "grass"))
    return Settings(
        sam_type="tiny", device="cpu", points=16, cache_dir=tmp_path / "cache", model_dir=tmp_path / "models",
        data_source="folder", data_dir=data, images_per_class=3, train_epochs=3,
    )  # fmt: skip


def test_a_job_publishes_a_self_describing_head_and_resumes(job_settings):
    result = train_labels(job_settings, TrainRequest(["tomato", "sky"], project="4", trigger="setup"))
    path = job_settings.model_dir / "heads" / result["file"]
    head = Head.load(path)
    assert head.class_names == ("tomato", "sky") and result["labels"] == ["tomato", "sky"]
    registry = head.info["registry"]
    assert set(registry["stage_seconds"]) == {"class_images", "embeddings", "training_and_validation", "publishing"}
    assert registry["project"] == "4" and registry["trigger"] == "setup"
    assert head.info["provenance"]["source"] == "folder"
    assert head.info["provenance"]["classes"]["sky"]["images"] == 3
    choice = HeadRegistry(job_settings.model_dir / "heads", "tiny").choose(
        parse_label_config(config_for("sky", "tomato"))
    )
    assert choice is not None and choice.version == result["version"] and not choice.missing

    bags = sorted((job_settings.cache_dir / "bags").rglob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in bags]
    again = train_labels(job_settings, TrainRequest(["tomato", "sky"]))
    assert again["version"] == result["version"]  # same data, same seed: the same head
    assert [p.stat().st_mtime_ns for p in bags] == stamps  # embeddings were reused, not recomputed
    assert len(list((job_settings.model_dir / "heads").glob("*.pt"))) == 1


def test_one_label_learns_against_background_images(job_settings):
    background = job_settings.data_dir / "_background"
    background.mkdir()
    for image in (job_settings.data_dir / "grass").iterdir():
        image.rename(background / image.name)
    result = train_labels(job_settings, TrainRequest(["tomato"]))
    head = Head.load(job_settings.model_dir / "heads" / result["file"])
    assert head.class_names == ("tomato",) and head.config.background


def test_job_ids_name_the_label_set():
    settings = Settings(sam_type="tiny")
    assert job_id(settings, ["Sky", "tomato"], cuda=False) == job_id(settings, ["tomato", "sky"], cuda=False)
    assert job_id(settings, ["sky"], cuda=False) != job_id(settings, ["sky", "tomato"], cuda=False)
    assert job_id(settings, ["sky"], cuda=False) != job_id(settings.replace(points=64), ["sky"], cuda=False)


def test_embedded_runner_is_idempotent_and_reports_failures(job_settings):
    runner = EmbeddedRunner(job_settings)
    request = {"labels": ["sky", "tomato"], "project": "1", "trigger": "setup"}
    first = runner.submit(request, "job-a")
    second = runner.submit(request, "job-a")
    assert second is first  # queued or running: never twice
    runner.wait(120)
    (done,) = runner.jobs()
    assert done["status"] == "finished" and done["result"]["labels"] == ["sky", "tomato"]
    assert done["progress"]["stage"] == "publishing"

    failing = runner.submit({"labels": ["sky", "zebra"], "trigger": "setup"}, "job-b")
    runner.wait(60)
    assert failing.status == "failed" and "no folder for label 'zebra'" in (failing.error or "")
    assert runner.submit({"labels": ["sky", "zebra"]}, "job-b") is failing  # not retried at once
    retried = runner.submit({"labels": ["sky", "zebra"]}, "job-b", force=True)  # Start training retries
    assert retried is not failing
    runner.wait(60)


def test_setup_trains_missing_labels_in_process_and_the_old_head_serves_meanwhile(job_settings):
    backend = Backend(job_settings)
    assert backend.runner.kind == "embedded"
    assert backend.setup("5.1", config_for("tomato", "sky"), None, None) == no_head_version("tiny")
    backend._submitter.shutdown(wait=True)  # the submission itself is asynchronous
    backend.runner.wait(120)  # type: ignore[attr-defined]
    first = backend.setup("5.1", config_for("tomato", "sky"), None, None)
    assert first.startswith("usam-tiny-") and "no-head" not in first

    backend = Backend(job_settings)
    assert backend.setup("5.1", config_for("tomato", "sky", "grass"), None, None) == first  # still serving
    assert backend.health()["projects"]["5"]["missing_labels"] == ["grass"]
    backend._submitter.shutdown(wait=True)
    backend.runner.wait(120)  # type: ignore[attr-defined]
    second = backend.setup("5.1", config_for("tomato", "sky", "grass"), None, None)
    assert second != first
    (job,) = [j for j in backend.training_status()["jobs"] if len(j["labels"]) == 3]
    assert job["status"] == "finished" and job["result"]["version"] == second
