"""Training jobs in-process: the five stages, resuming, publishing, and the embedded runner."""

import pytest

from training import Head
from training.recipe import Recipe, RecipeMismatch
from usam_backend.core.settings import Settings
from usam_backend.jobs.policy import labels_job, recipe_for
from usam_backend.jobs.runners import EmbeddedRunner, JobSpec, run_function
from usam_backend.jobs.training import train_labels_job
from usam_backend.labelstudio.config import parse_label_config
from usam_backend.registry import HeadRegistry, no_head_version
from usam_backend.server.service import Backend

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


def train_labels(settings: Settings, labels: list[str], *, project: str | None = None, trigger: str = "test") -> dict:
    spec = labels_job(recipe_for(settings), labels, project=project, trigger=trigger)
    return dict(run_function(spec.function, settings, spec.request, None))


def test_a_job_publishes_a_self_describing_head_and_resumes(job_settings):
    result = train_labels(job_settings, ["tomato", "sky"], project="4", trigger="setup")
    path = job_settings.model_dir / "heads" / result["file"]
    head = Head.load(path)
    assert head.class_names == ("sky", "tomato") and result["labels"] == ["sky", "tomato"]
    registry = head.info["registry"]
    assert set(registry["stage_seconds"]) == {"class_images", "embeddings", "training_and_validation", "publishing"}
    assert registry["project"] == "4" and registry["trigger"] == "setup" and registry["kind"] == "labels"
    assert registry["recipe"] == recipe_for(job_settings).to_dict()  # what shaped it, in the head
    assert head.info["provenance"]["source"] == "folder"
    assert head.info["provenance"]["classes"]["sky"]["images"] == 3
    choice = HeadRegistry(job_settings.model_dir / "heads", "tiny").choose(
        parse_label_config(config_for("sky", "tomato")).labels
    )
    assert choice is not None and choice.version == result["version"] and not choice.missing

    bags = sorted((job_settings.cache_dir / "bags").rglob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in bags]
    again = train_labels(job_settings, ["tomato", "sky"])
    assert again["version"] == result["version"]  # same data, same seed: the same head
    assert [p.stat().st_mtime_ns for p in bags] == stamps  # embeddings were reused, not recomputed
    assert len(list((job_settings.model_dir / "heads").glob("*.pt"))) == 1


def test_one_label_learns_against_background_images(job_settings):
    background = job_settings.data_dir / "_background"
    background.mkdir()
    for image in (job_settings.data_dir / "grass").iterdir():
        image.rename(background / image.name)
    result = train_labels(job_settings, ["tomato"])
    head = Head.load(job_settings.model_dir / "heads" / result["file"])
    assert head.class_names == ("tomato",) and head.config.background


def test_job_ids_name_the_label_set_and_its_recipe():
    recipe = recipe_for(Settings(sam_type="tiny"))

    def job_id(recipe: Recipe, labels: list[str]) -> str:
        return labels_job(recipe, labels, project=None, trigger="test").id

    assert job_id(recipe, ["Sky", "tomato"]) == job_id(recipe, ["tomato", "sky"])
    assert job_id(recipe, ["sky"]) != job_id(recipe, ["sky", "tomato"])
    assert job_id(recipe, ["sky"]) != job_id(recipe_for(Settings(sam_type="tiny", points=64)), ["sky"])
    assert job_id(recipe, ["sky"]) != job_id(recipe_for(Settings(sam_type="tiny", train_epochs=3)), ["sky"])


def test_a_worker_trains_the_recipe_it_is_sent_not_its_own_settings(job_settings):
    server = job_settings.replace(points=4, train_epochs=2, images_per_class=2)
    spec = labels_job(recipe_for(server), ["tomato", "sky"], project="4", trigger="setup")
    result = train_labels_job(job_settings, spec.request)  # the worker's own environment says 16 points
    head = Head.load(job_settings.model_dir / "heads" / result["file"])
    assert head.info["points"] == 4 and head.info["registry"]["recipe"]["train_epochs"] == 2
    assert head.info["provenance"]["classes"]["sky"]["images"] == 2


def test_a_worker_refuses_a_recipe_for_other_sam_weights(job_settings):
    spec = labels_job(recipe_for(job_settings.replace(sam_type="vit_b")), ["sky"], project="4", trigger="setup")
    with pytest.raises(RecipeMismatch, match=r"SAM vit_b .* this worker runs SAM tiny"):
        train_labels_job(job_settings, spec.request)
    other_weights = Recipe.from_dict({**spec.request["recipe"], "sam_type": "tiny", "sam_fingerprint": "tiny-other"})
    with pytest.raises(RecipeMismatch, match="weights tiny-other, but this worker loaded tiny-random"):
        train_labels_job(job_settings, {**spec.request, "recipe": other_weights.to_dict()})
    assert not (job_settings.model_dir / "heads").exists()


def test_embedded_runner_is_idempotent_and_reports_failures(job_settings):
    runner = EmbeddedRunner(job_settings)
    recipe = recipe_for(job_settings)
    spec = labels_job(recipe, ["sky", "tomato"], project="1", trigger="setup")
    first = runner.submit(spec)
    second = runner.submit(spec)
    assert second is first  # queued or running: never twice
    runner.wait(120)
    (done,) = runner.jobs()
    assert done["status"] == "finished" and done["result"]["labels"] == ["sky", "tomato"]
    assert done["progress"]["stage"] == "publishing" and done["kind"] == "labels"

    zebra = labels_job(recipe, ["sky", "zebra"], project=None, trigger="setup")
    failing = runner.submit(zebra)
    runner.wait(60)
    assert failing.status == "failed" and "no folder for label 'zebra'" in (failing.error or "")
    assert runner.submit(zebra) is failing  # not retried at once
    retried = runner.submit(zebra, force=True)  # Start training retries
    assert retried is not failing
    runner.wait(60)


def test_runners_call_any_job_function_by_its_dotted_path(job_settings):
    runner = EmbeddedRunner(job_settings)
    spec = JobSpec("job-c", "json.loads", {"labels": []}, "custom", "not a usam job")
    runner.submit(spec)
    runner.wait(30)
    (job,) = runner.jobs()
    assert job["status"] == "failed" and job["kind"] == "custom" and "TypeError" in job["error"]


def test_setup_trains_missing_labels_in_process_and_the_old_head_serves_meanwhile(job_settings):
    backend = Backend(job_settings)
    assert backend.runner.kind == "embedded"
    assert backend.setup("5.1", config_for("tomato", "sky"), None, None) == no_head_version("tiny")
    backend.policy.drain()  # the submission itself is asynchronous
    backend.runner.wait(120)  # type: ignore[attr-defined]
    first = backend.setup("5.1", config_for("tomato", "sky"), None, None)
    assert first.startswith("usam-tiny-") and "no-head" not in first

    backend = Backend(job_settings)
    assert backend.setup("5.1", config_for("tomato", "sky", "grass"), None, None) == first  # still serving
    assert backend.health()["projects"]["5"]["missing_labels"] == ["grass"]
    backend.policy.drain()
    backend.runner.wait(120)  # type: ignore[attr-defined]
    second = backend.setup("5.1", config_for("tomato", "sky", "grass"), None, None)
    assert second != first
    (job,) = [j for j in backend.training_status()["jobs"] if len(j["labels"]) == 3]
    assert job["status"] == "finished" and job["result"]["version"] == second


def test_calibration_tasks_are_held_out_of_training_whole():
    from usam_backend.jobs.training import split_for_calibration
    from usam_backend.labelstudio.feedback import Comparison, TaskFeedback

    def tasks(n: int) -> list[TaskFeedback]:
        return [TaskFeedback(i, i, {}, [], Comparison(), None) for i in range(n)]

    assert split_for_calibration(tasks(3)) == (tasks(3), [])  # too few: all train, no calibration
    train, held = split_for_calibration(tasks(4))
    assert [t.task for t in held] == [3] and [t.task for t in train] == [0, 1, 2]
    train, held = split_for_calibration(tasks(12))
    assert [t.task for t in held] == [4, 9] and not {t.task for t in train} & {4, 9} and len(train) == 10


def test_project_heads_are_pruned_to_the_newest_and_the_serving_one(tmp_path):
    import os

    from usam_backend.tools.bench_health import _head

    folder = tmp_path / "heads"
    paths = []
    for i in range(6):
        path = _head(("sky", "tomato"), "5", seed=i).save(folder / f"p5-{i}.pt")
        os.utime(path, ns=(i * 10**9, i * 10**9))  # p5-5 is the newest
        paths.append(path)
    shared = _head(("sky",), None, seed=9).save(folder / "shared.pt")
    other = _head(("sky",), "6", seed=10).save(folder / "p6.pt")
    registry = HeadRegistry(folder, "tiny")
    pruned = registry.prune("5", keep=3, protect={paths[0]})  # the oldest still serves the project
    assert sorted(p.name for p in pruned) == ["p5-1.pt", "p5-2.pt"]
    assert sorted(p.name for p in folder.glob("*.pt")) == ["p5-0.pt", "p5-3.pt", "p5-4.pt", "p5-5.pt", "p6.pt",
                                                           "shared.pt"]  # fmt: skip
    assert shared.exists() and other.exists() and len(registry.infos()) == 6


def test_an_in_process_job_stops_at_usam_job_timeout(job_settings):
    runner = EmbeddedRunner(job_settings.replace(job_timeout=1))
    spec = JobSpec("slow", "tests_job_helpers.slow_job", {"seconds": 5}, "custom", "sleeps, reporting progress")
    runner.submit(spec)
    runner.wait(30)
    (job,) = runner.jobs()
    assert job["status"] == "failed" and "USAM_JOB_TIMEOUT=1" in job["error"]
