"""What annotators see: Label Studio 1.23.2's editor in Debian's Chromium, driven by playwright, with
usam (the tiny random SAM and a head trained on the test classes) as the project's ML backend.

One browser and one logged-in page serve every test; each test leaves its screenshots under
``tests/artifacts/browser/<test>/``. The tiny SAM's masks are noise (random weights), so the brush
checks are pixel by pixel: the editor must draw exactly the pixels of the prediction's mask. Where the
geometry must be right (a video track over a moving object), the prediction is made by usam's video
job with a geometric ORACLE in place of the head's segmenter."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from scipy import ndimage
from test_label_studio_video import frames, write_portrait

from usam_backend.core.masks import mask_boxes
from usam_backend.core.regions import Regions
from usam_backend.core.settings import Settings
from usam_backend.core.shapes import polygons_mask
from usam_backend.core.video import write_video
from usam_backend.jobs import video as video_jobs

from browser_helpers import ARTIFACTS, CHROMIUM, Editor, Shown
from conftest import CLASS_COLORS, scene
from helpers import UsamServer, WebHost, project_config, reply, wait_until

pytestmark = [pytest.mark.labelstudio, pytest.mark.browser]

LABELS = {"Sky": "sky", "tomato": None}
H, W = 160, 240
TOMATO = (20, 30, 100, 130)  # XYXY in the test image
IMAGE_ISSUE = "There was an issue loading URL from $image value"  # Label Studio's own message


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium (``make system-packages``) through playwright: no browser is downloaded.
    One for this file, which holds every browser test (so one per session); it is closed when the
    file ends, because playwright's sync API keeps an asyncio loop running in the main thread while
    it is open, which later tests' own event loops cannot share."""
    required = os.environ.get("USAM_REQUIRE_BROWSER")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        if required:
            pytest.fail(f"playwright cannot be imported ({exc}): run `make test` (it installs the dev extras)")
        pytest.skip("playwright is not installed here; `make test` installs it")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"{CHROMIUM} is missing: run `make test` (it installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing; `make test` installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless=new"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def editor(browser, label_studio) -> Editor:
    """One page, logged in as Label Studio's admin, reused by every browser test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    page = context.new_page()
    opened = Editor(page, label_studio.url, ARTIFACTS)
    opened.login()
    yield opened
    context.close()


@pytest.fixture(autouse=True)
def screenshots(request):
    """Each browser test's screenshots go to a folder named after it; the last one is taken whatever
    the outcome, so that a failing run can be looked at."""
    if "editor" not in request.fixturenames:
        yield
        return
    editor: Editor = request.getfixturevalue("editor")
    editor.folder = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    editor.shots.clear()
    yield
    editor.shot("end")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("browser-images") / "two.png"
    Image.fromarray(scene((H, W), [("tomato", TOMATO), ("sky", (140, 30, 220, 130))], seed=31)).save(path)
    return path


@pytest.fixture(scope="module")
def models(trained_head, tmp_path_factory) -> Path:
    """usam's model folder: the head, and the projects ``/setup`` stores."""
    folder = tmp_path_factory.mktemp("browser-models")
    trained_head.save(folder / "heads" / "head.pt")
    return folder


@pytest.fixture(scope="module")
def usam(label_studio, models, tmp_path_factory):
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "64", "USAM_MODEL_DIR": str(models),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("browser-cache")), "USAM_AUTO_TRAIN": "false",
        "USAM_ALLOWED_HOSTS": "127.0.0.1",  # the frame sequence's host
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.personal_token(),
    }  # fmt: skip
    server = UsamServer(env, models / "serve.log")
    yield server
    server.stop()


def make_project(label_studio, usam, template: str, image: Path, *, missing: bool = False) -> dict:
    """A project from a shipped template with the image uploaded (and a task whose image is not there),
    usam connected, and *Retrieve predictions* run on every task."""
    sdk = label_studio.sdk
    pid = sdk.projects.create(title=f"browser {template}", label_config=project_config(template, LABELS)).id
    label_studio.upload(pid, image)
    if missing:
        sdk.projects.import_tasks(id=pid, request=[{"image": f"{label_studio.url}/data/upload/{pid}/missing.png"}])
    count = 2 if missing else 1
    wait_until(lambda: len(list(sdk.tasks.list(project=pid))) == count, 60, f"{count} task(s)")
    sdk.ml.create(url=usam.url, project=pid, title="usam", is_interactive=template.startswith("interactive"))
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    tasks = {("missing" if "missing" in t.data["image"] else "image"): t for t in sdk.tasks.list(project=pid)}
    predictions = {kind: sdk.predictions.list(task=task.id) for kind, task in tasks.items()}
    return {"id": pid, "tasks": tasks, "predictions": predictions}


def brush_mask(region: dict) -> np.ndarray:
    return np.asarray(decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0)


def shape_mask(region: dict) -> np.ndarray:
    """A rectangle's or polygon's pixels as pycocotools draws them (percent coordinates to pixels)."""
    value = region["value"]
    if region["type"] == "rectanglelabels":
        x0, y0 = value["x"] * W / 100, value["y"] * H / 100
        x1, y1 = x0 + value["width"] * W / 100, y0 + value["height"] * H / 100
        polygon = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    else:
        polygon = np.asarray(value["points"], dtype=float) * [W / 100, H / 100]
    return polygons_mask([polygon], H, W)


@pytest.fixture(scope="module")
def brush_project(label_studio, usam, image) -> dict:
    return make_project(label_studio, usam, "semantic_brush.xml", image, missing=True)


def test_brush_preannotation_is_listed_drawn_and_saved_as_predicted(label_studio, editor, brush_project):
    """The Regions panel lists each predicted region with its label; the editor draws exactly the
    prediction's pixels over the image; submitted, the annotation Label Studio saves is the prediction."""
    task = brush_project["tasks"]["image"]
    (prediction,) = brush_project["predictions"]["image"]
    assert prediction.result, "usam predicted no region for the image"
    editor.open_task(brush_project["id"], task.id)
    listed = editor.region_labels(len(prediction.result))
    assert sorted(listed) == sorted(region["value"]["brushlabels"][0] for region in prediction.result)

    predicted = np.logical_or.reduce([brush_mask(region) for region in prediction.result])
    drawn = editor.drawn(H, W)
    editor.shot("predicted")
    assert drawn.seen.mean() > 0.8, "the editor shows too little of the image to judge"
    assert drawn.mask.any() and (~predicted & drawn.seen).any()  # something drawn, something left clear
    assert np.array_equal(drawn.mask, predicted & drawn.seen), "the editor draws other pixels than predicted"

    editor.page.get_by_role("button", name="Submit").click()
    sdk = label_studio.sdk
    wait_until(lambda: len(sdk.annotations.list(id=task.id)) == 1, 60, "the submitted annotation")
    editor.shot("submitted")
    (annotation,) = sdk.annotations.list(id=task.id)
    saved = sorted(annotation.result, key=lambda region: region["id"])
    want = sorted(prediction.result, key=lambda region: region["id"])
    assert [r["value"]["brushlabels"] for r in saved] == [r["value"]["brushlabels"] for r in want]
    for got, expected in zip(saved, want, strict=True):
        assert np.array_equal(brush_mask(got), brush_mask(expected)), "the saved mask differs from the prediction"


def test_an_image_that_cannot_be_fetched_shows_label_studios_message(editor, brush_project):
    """Label Studio's own message, no stage, no regions; the console's errors are the image's own
    failed loads only (usam's empty prediction adds none)."""
    task = brush_project["tasks"]["missing"]
    (prediction,) = brush_project["predictions"]["missing"]
    assert prediction.result == [] and prediction.score == 0.0
    editor.open_task(brush_project["id"], task.id)
    editor.page.get_by_text(IMAGE_ISSUE).wait_for()
    editor.shot("message")
    assert editor.page.locator(".konvajs-content").count() == 0
    assert editor.region_labels(0, timeout=5) == []
    image_url = task.data["image"]
    # Label Studio's own static 404s (see browser_helpers.KNOWN_404) aside, only the image failed to load
    assert {url for status, url in editor.failed if status != 404} == {image_url}, editor.failed
    assert all(text.startswith("Failed to load resource") for text in editor.errors()), editor.errors()


@pytest.mark.parametrize(
    ("template", "kind"), [("rectangles.xml", "rectanglelabels"), ("polygons.xml", "polygonlabels")]
)
def test_shape_predictions_are_drawn_over_the_object(label_studio, usam, editor, image, template, kind):
    """A rectangle or polygon project: each predicted shape is listed with its label and filled where
    its coordinates say (1 px of outline aside), covering the tomato it was predicted for."""
    project = make_project(label_studio, usam, template, image)
    (prediction,) = project["predictions"]["image"]
    assert prediction.result and {region["type"] for region in prediction.result} == {kind}
    editor.open_task(project["id"], project["tasks"]["image"].id)
    listed = editor.region_labels(len(prediction.result))
    assert sorted(listed) == sorted(region["value"][kind][0] for region in prediction.result)
    drawn = editor.drawn(H, W, level=1)  # shapes are filled faintly
    editor.shot("predicted")
    shapes = np.logical_or.reduce([shape_mask(region) for region in prediction.result])
    inside = ndimage.binary_erosion(shapes, iterations=2) & drawn.seen
    outside = ~ndimage.binary_dilation(shapes, iterations=2) & drawn.seen
    assert inside.any() and drawn.mask[inside].all(), "part of a predicted shape is not drawn"
    assert not drawn.mask[outside].any(), "the editor draws outside the predicted shapes"
    x0, y0, x1, y1 = TOMATO
    assert drawn.mask[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].mean() > 0.5, "the shapes miss the tomato"


@pytest.fixture(scope="module")
def smart_project(label_studio, usam, image) -> dict:
    return make_project(label_studio, usam, "interactive_brush.xml", image)


def smart_click(editor: Editor, project: dict) -> dict:
    """A blank annotation, Auto-Annotation on, the smart key point with the tomato label, one click on the
    tomato: usam's answer (the suggestion Label Studio received)."""
    editor.open_task(project["id"], project["tasks"]["image"].id)
    editor.page.get_by_role("button", name="Create an annotation").click()
    editor.auto_annotation()
    editor.page.locator(".lsf-labels").nth(1).locator(".lsf-label", has_text="tomato").click()  # KeyPointLabels
    editor.smart_tool("key-point-tool")
    x0, y0, x1, y1 = TOMATO
    with editor.page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=90_000) as answered:
        editor.page.mouse.click(*editor.screen_point((x0 + x1) / 2, (y0 + y1) / 2, H, W))
    response = answered.value
    assert response.status == 200, response.text()
    editor.page.get_by_text("1 suggestions").wait_for()
    editor.shot("suggested")
    (region,) = response.json()["data"]["result"]
    return region


def near_click(radius: int = 4) -> np.ndarray:
    """The pixels the key point itself is drawn on, around the tomato's centre."""
    x0, y0, x1, y1 = TOMATO
    yy, xx = np.mgrid[:H, :W]
    return np.asarray((abs(xx - (x0 + x1) / 2) <= radius) & (abs(yy - (y0 + y1) / 2) <= radius))


def test_a_smart_click_suggestion_is_drawn_accepted_and_saved(label_studio, editor, smart_project):
    """Smart key point with Auto-Annotation on: usam's mask is drawn as the suggestion (pixel for pixel,
    the key point aside); accepted, it is the one region left, and submitted, Label Studio saves that mask
    under the clicked label."""
    region = smart_click(editor, smart_project)
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["tomato"]
    suggested = brush_mask(region)
    drawn = editor.drawn(H, W)
    away = drawn.seen & ~near_click()
    assert np.array_equal(drawn.mask[away], suggested[away]), "the suggestion is drawn on other pixels than usam's"

    editor.page.locator("[data-testid=bottombar-accept-suggestions-button]").click()
    assert editor.region_labels(1) == ["tomato"]  # the accepted mask; the key point that asked for it is gone
    editor.shot("accepted")
    sdk = label_studio.sdk
    task = smart_project["tasks"]["image"]
    before = len(sdk.annotations.list(id=task.id))
    editor.page.get_by_role("button", name="Submit").click()
    wait_until(lambda: len(sdk.annotations.list(id=task.id)) == before + 1, 60, "the submitted annotation")
    saved = max(sdk.annotations.list(id=task.id), key=lambda annotation: annotation.id)
    (brush,) = saved.result
    assert brush["type"] == "brushlabels" and brush["value"]["brushlabels"] == ["tomato"]
    assert np.array_equal(brush_mask(brush), suggested), "the saved mask differs from usam's answer"


def test_a_rejected_suggestion_leaves_nothing_drawn(editor, smart_project):
    """Rejected, the suggestion goes, and with it the smart key point that asked for it."""
    smart_click(editor, smart_project)
    assert editor.drawn(H, W).mask.any()
    editor.page.locator("[data-testid=bottombar-reject-suggestions-button]").click()
    editor.page.get_by_text("1 suggestions").wait_for(state="detached")
    editor.shot("rejected")
    assert editor.region_labels(0) == []
    assert not editor.drawn(H, W).mask.any(), "something is still drawn after the rejection"


def colour_mask(rgb: np.ndarray, name: str) -> np.ndarray:
    """Where a test scene's class is (``conftest.scene``): pixels within 60 of its colour in every channel,
    less the background's stray pixels of that colour (an opening by 3x3)."""
    near = np.abs(rgb.astype(int) - CLASS_COLORS[name]).max(axis=2) < 60
    return np.asarray(ndimage.binary_opening(near, np.ones((3, 3), bool)))


def colour_box(rgb: np.ndarray, name: str) -> np.ndarray:
    return mask_boxes(colour_mask(rgb, name)[None])[0]


class ColourOracle:
    """ORACLE with SemanticSegmenter's ``segment`` over the test scenes: each class asked for is the
    pixels of its colour in the frame usam decoded (so the display rotation and the codec's blur are
    usam's own), one region per class seen, scored 0.9. It stands in for the head's segmenter only,
    whose masks from random weights are noise; everything around it is usam's video job."""

    def __init__(self, class_names: tuple[str, ...]):
        self.class_names = class_names

    @classmethod
    def from_settings(cls, engine, head, settings) -> ColourOracle:  # SemanticSegmenter's constructor
        return cls(tuple(head.class_names))

    def segment(self, image: np.ndarray, *, classes=None) -> Regions:
        masks = [colour_mask(image, name) for name in self.class_names if not classes or name in classes]
        ids = [i for i, name in enumerate(self.class_names) if not classes or name in classes]
        kept = [(mask, i) for mask, i in zip(masks, ids, strict=True) if mask.sum() > 50]
        n = len(kept)
        return Regions(
            masks=np.stack([mask for mask, _ in kept]) if n else np.zeros((0, *image.shape[:2]), bool),
            class_ids=np.array([i for _, i in kept], dtype=np.int64), scores=np.full(n, 0.9, np.float32),
            points=np.zeros((n, 2), np.float32), sam_scores=np.ones(n, np.float32), class_names=self.class_names,
        )  # fmt: skip


@pytest.fixture(scope="module")
def video_project(label_studio, usam, models, tmp_path_factory) -> dict:
    """A ``<Video>`` project with a landscape clip and a phone's portrait clip (coded sideways, turned
    by its display matrix) of the tomato crossing the frame, usam connected (``/setup``), and each
    video predicted by usam's video job (``usam_backend.jobs.video.video_task_job``, what *Retrieve
    predictions* runs: the video fetched from Label Studio, decoded, found on every 3rd frame, linked
    into a track and posted) with :class:`ColourOracle` as the head's segmenter."""
    folder = tmp_path_factory.mktemp("browser-video")
    landscape = frames()
    portrait = [np.ascontiguousarray(np.rot90(frame, -1)) for frame in landscape]  # as the player shows it
    sdk = label_studio.sdk
    config = project_config("video_tracks.xml", {"tomato": None})
    config = config.replace('value="tomato"', 'value="tomato" background="#FFD000"')  # a box that shows in pictures
    pid = sdk.projects.create(title="browser video", label_config=config).id
    label_studio.upload(pid, write_video(folder / "tomato.mp4", landscape, 24), "video/mp4")
    label_studio.upload(pid, write_portrait(folder / "portrait.mp4", portrait), "video/mp4")
    tasks = {("portrait" if "portrait" in t.data["video"] else "landscape"): t for t in sdk.tasks.list(project=pid)}
    sdk.ml.create(url=usam.url, project=pid, title="usam")
    settings = Settings(sam_type="tiny", device="cpu", model_dir=models, cache_dir=folder / "cache", video_stride=3,
                        video_chunk=12, label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.personal_token())  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video_jobs, "SemanticSegmenter", ColourOracle)
        for task in tasks.values():
            counts = video_jobs.video_task_job(settings, {"project": str(pid), "tasks": [task.id]})
            assert counts["predicted"] == 1, counts
    return {"id": pid, "tasks": tasks, "frames": {"landscape": landscape, "portrait": portrait}}


@pytest.mark.parametrize("clip", ["landscape", "portrait"])
def test_a_video_track_is_drawn_over_the_moving_object_on_each_frame(label_studio, editor, video_project, clip):
    """The video's track is listed with its label; stepped to with the player's own controls (its
    *Step forward* button, then its frame counter), each frame shows the clip's frame of that number
    (upright, for the portrait clip) and the track's box drawn over the tomato where it is on that
    frame, within 3 px (keyframes and the frames Label Studio interpolates alike). The track is made by
    usam's video job with :class:`ColourOracle` as the head's segmenter (see ``video_project``). The console
    has no error."""
    task = video_project["tasks"][clip]
    source = video_project["frames"][clip]
    (prediction,) = label_studio.sdk.predictions.list(task=task.id)
    (track,) = prediction.result
    assert track["type"] == "videorectangle" and track["value"]["labels"] == ["tomato"]
    editor.open_task(video_project["id"], task.id)
    assert editor.region_labels(1) == ["tomato"]

    def look() -> Shown:
        view = editor.shown_frame()
        editor.shot(f"frame-{view.frame:02d}")
        return view

    shown = [look()]
    for _ in range(3):  # 10 frames a step, the last step stopping on the last frame (the track's last keyframe)
        editor.step_forward()
        shown.append(look())
    for frame in (6, len(source) - 1):  # the counter takes 1 to the frame before the last (Label Studio 1.23.2)
        editor.go_to_frame(frame)
        shown.append(look())
    assert [view.frame for view in shown] == [1, 11, 21, len(source), 6, len(source) - 1]
    boxes = []
    for view in shown:
        height, width = source[0].shape[:2]
        assert view.rgb.shape == (height, width, 3), f"the player shows a {view.rgb.shape[1]}x{view.rgb.shape[0]} frame"
        on_screen = colour_box(view.rgb, "tomato")
        truth = colour_box(source[view.frame - 1], "tomato")
        assert np.abs(on_screen - truth).max() <= 2, f"frame {view.frame} shows the tomato at {on_screen}, not {truth}"
        assert view.drawn.any(), f"no box is drawn on frame {view.frame}"
        drawn = mask_boxes(view.drawn[None])[0]
        assert np.abs(drawn - on_screen).max() <= 3, f"frame {view.frame}: the box {drawn}, the tomato {on_screen}"
        boxes.append(drawn)
    assert np.abs(boxes[0] - boxes[2]).max() > 50, "the box does not move with the tomato"
    assert editor.errors() == [], editor.errors()  # the track adds no console error


@pytest.fixture(scope="module")
def sequence_project(label_studio, usam, tmp_path_factory) -> dict:
    """A frame-sequence task of four frames of the crossing tomato, 7-8 frames apart, served by a web host
    that allows the editor's cross-origin loads, and *Retrieve predictions* run."""
    chosen = [frames()[t] for t in (0, 8, 16, 23)]
    files = {f"/{i}.png": _png(frame) for i, frame in enumerate(chosen)}
    host = WebHost(tmp_path_factory.mktemp("browser-frames"), {
        path: reply(200, body, {"Content-Type": "image/png", "Access-Control-Allow-Origin": "*"})
        for path, body in files.items()
    })  # fmt: skip
    sdk = label_studio.sdk
    config = project_config("frame_sequence_brush.xml", LABELS)
    pid = sdk.projects.create(title="browser frames", label_config=config).id
    sdk.projects.import_tasks(id=pid, request=[{"frames": [host.url + path for path in files]}])
    (task,) = sdk.tasks.list(project=pid)
    sdk.ml.create(url=usam.url, project=pid, title="usam")
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    (prediction,) = sdk.predictions.list(task=task.id)
    yield {"id": pid, "task": task, "prediction": prediction, "count": len(chosen)}
    host.stop()


def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def test_each_frame_of_a_sequence_shows_its_own_regions(editor, sequence_project):
    """Stepped through with the pager's *Next Image*, each frame of the sequence shows exactly the
    pixels of the regions predicted for it (``item_index``), and none of the other frames' regions;
    the Regions panel lists every frame's regions; the console has no error."""
    result = sequence_project["prediction"].result
    count = sequence_project["count"]
    expected = [np.zeros((H, W), bool) for _ in range(count)]
    for region in result:
        expected[region["item_index"]] |= brush_mask(region)
    assert sum(mask.any() for mask in expected) >= 2, "usam predicted regions on fewer than two frames"
    editor.open_task(sequence_project["id"], sequence_project["task"].id)
    assert sorted(editor.region_labels(len(result))) == sorted(r["value"]["brushlabels"][0] for r in result)
    for item in range(count):
        if item:
            assert editor.next_item() == item + 1
        drawn = editor.drawn_settled(H, W)
        editor.shot(f"item-{item + 1}")
        assert drawn.seen.mean() > 0.8, "the editor shows too little of the frame to judge"
        others = np.logical_or.reduce([mask for i, mask in enumerate(expected) if i != item])
        assert (others & ~expected[item] & drawn.seen).any(), "the other frames' regions cannot be told apart here"
        assert np.array_equal(drawn.mask, expected[item] & drawn.seen), f"frame {item + 1} shows other pixels"
    assert editor.errors() == [], editor.errors()  # the regions add no console error
