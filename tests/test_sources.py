"""Class-image sources: a user's folder, Stable Diffusion, and openly licensed web images."""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from training.class_store import ClassStore, label_key
from training.progress import Progress
from training.sources.folder import FolderSource
from training.sources.synthetic import SyntheticSource
from training.sources.web import WebSource
from usam_backend.core.errors import DataError
from usam_backend.core.settings import Settings

from conftest import write_class_folders
from helpers import WebHost, reply


def quiet() -> Progress:
    return Progress(bars=False)


def test_folder_source_matches_labels_without_case(tmp_path):
    data = write_class_folders(tmp_path / "data", per_class=3, size=32)
    source = FolderSource(data)
    assert [p.name for p in source.collect("SKY", None, quiet())] == ["000.png", "001.png", "002.png"]
    assert len(source.collect("tomato", 2, quiet())) == 2
    with pytest.raises(DataError, match="no folder for label 'cat'"):
        source.collect("cat", None, quiet())
    with pytest.raises(DataError, match="needs USAM_DATA_DIR"):
        FolderSource(None)


@pytest.fixture
def sd_settings(tmp_path, tiny_sd_model):
    return Settings(
        cache_dir=tmp_path / "cache", sd_model=str(tiny_sd_model), sd_steps=2, sd_size=64, sd_batch=3, device="cpu"
    )


def test_synthetic_images_are_seeded_recorded_and_resumable(sd_settings, tmp_path):
    store = ClassStore(sd_settings.cache_dir / "classes")
    source = SyntheticSource(sd_settings, store, cuda=False)
    first = source.collect("tomato", 4, quiet())
    assert len(first) == 4 and all(Image.open(p).size == (64, 64) for p in first)
    manifest = json.loads((first[0].parent / "manifest.json").read_text())
    assert len(manifest["images"]) == 6  # whole batches of 3: two extra images kept for later
    assert [image["meta"]["prompt"] for image in manifest["images"]] == ["a photo of a tomato"] * 6
    assert len({image["meta"]["seed"] for image in manifest["images"]}) == 6
    stored = sorted(first[0].parent.glob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in stored}

    more = source.collect("tomato", 8, quiet())  # resumes with one more batch; nothing redone
    assert more[:4] == first and len(more) == 8
    assert all(p.stat().st_mtime_ns == stamps[p] for p in stored)

    other = sd_settings.replace(cache_dir=tmp_path / "other")
    again = SyntheticSource(other, ClassStore(tmp_path / "other"), cuda=False).collect("tomato", 8, quiet())
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in more]  # same seeds, same images


def test_synthetic_model_that_cannot_load(tmp_path):
    settings = Settings(cache_dir=tmp_path, sd_model=str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(DataError, match=r"could not load the Stable Diffusion model.*USAM_DATA_SOURCE=web"):
        SyntheticSource(settings, ClassStore(tmp_path), cuda=False).collect("cat", 1, quiet())


def png(color, size=(200, 150)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_api(tmp_path):
    """A loopback server replaying Openverse and Wikimedia Commons answers of the real shape."""
    root = tmp_path / "www"
    root.mkdir()
    for i in range(6):
        (root / f"ov{i}.png").write_bytes(png((40 * i, 80, 120)))
    (root / "dup.png").write_bytes(png((0, 80, 120)))  # the same bytes as ov0.png
    (root / "tiny.png").write_bytes(png((9, 9, 9), size=(40, 30)))
    (root / "broken.png").write_bytes(b"not an image")
    (root / "commons.png").write_bytes(png((200, 10, 10)))
    calls = {"openverse": 0}
    host = WebHost(root)

    def openverse(handler):
        calls["openverse"] += 1
        if calls["openverse"] == 1:  # the first request is rate limited
            return reply(429, b"slow down", {"Retry-After": "1"})(handler)
        page = int(handler.path.split("page=")[1].split("&")[0])
        names = ["ov0", "ov1", "dup", "tiny", "broken", "ov2"] if page == 1 else ["ov3", "ov4", "ov5"]
        results = [
            {
                "id": name, "title": f"A {name}", "url": f"{host.url}/{name}.png", "creator": f"Author {name}",
                "license": "by-sa", "license_version": "4.0", "license_url": "https://creativecommons.org/licenses/by-sa/4.0/",
                "foreign_landing_url": f"https://example.org/{name}", "width": 40 if name == "tiny" else 200,
                "height": 30 if name == "tiny" else 150,
            }
            for name in names
        ]  # fmt: skip
        body = json.dumps({"result_count": 9, "page_count": 2, "results": results}).encode()
        reply(200, body, {"Content-Type": "application/json"})(handler)

    def commons(handler):
        info = {
            "url": f"{host.url}/commons.png", "thumburl": f"{host.url}/commons.png", "thumbwidth": 200,
            "thumbheight": 150, "mime": "image/png", "descriptionurl": "https://commons.example/File:Red.png",
        }  # fmt: skip
        info["extmetadata"] = {"LicenseShortName": {"value": "CC BY 4.0"}, "Artist": {"value": "<a>Ann &amp; Bo</a>"}}
        body = {"query": {"pages": [{"title": "File:Red.png", "imageinfo": [info]}]}}
        reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})(handler)

    host.routes.update({"/v1/images/": openverse, "/w/api.php": commons})
    yield host, calls
    host.stop()


def web_settings(tmp_path, host, **extra):
    return Settings(
        cache_dir=tmp_path / "cache", openverse_url=host.url, commons_url=f"{host.url}/w/api.php",
        allowed_hosts=("127.0.0.1",), web_interval=0.05, web_min_side=64, **extra,
    )  # fmt: skip


def test_web_images_keep_licences_and_drop_duplicates_small_and_broken(tmp_path, image_api):
    host, calls = image_api
    settings = web_settings(tmp_path, host)
    store = ClassStore(settings.cache_dir / "classes")
    started = time.monotonic()
    files = WebSource(settings, store).collect("tomato", 6, quiet())
    assert time.monotonic() - started >= 1.0  # waited out the 429's Retry-After
    assert calls["openverse"] == 3  # 429, page 1, page 2
    assert len(files) == 6 and len({p.read_bytes() for p in files}) == 6
    manifest = json.loads((files[0].parent / "manifest.json").read_text())
    names = [image["meta"]["title"] for image in manifest["images"]]
    assert names == ["A ov0", "A ov1", "A ov2", "A ov3", "A ov4", "A ov5"]  # dup, tiny and broken dropped
    first = manifest["images"][0]["meta"]
    assert first["license"] == "BY-SA 4.0" and first["author"] == "Author ov0"
    assert first["source_page"] == "https://example.org/ov0"


def test_web_falls_back_to_commons_and_stops_when_exhausted(tmp_path, image_api):
    host, _ = image_api
    settings = web_settings(tmp_path, host)
    files = WebSource(settings, ClassStore(settings.cache_dir / "classes")).collect("tomato", 50, quiet())
    manifest = json.loads((files[0].parent / "manifest.json").read_text())
    assert len(files) == 7 and manifest["exhausted"]
    last = manifest["images"][-1]["meta"]
    assert last["api"] == "commons" and last["license"] == "CC BY 4.0" and last["author"] == "Ann & Bo"


def test_web_refuses_internal_image_hosts_unless_allowed(tmp_path, image_api):
    host, _ = image_api
    settings = web_settings(tmp_path, host).replace(allowed_hosts=())
    with pytest.raises(DataError, match="found no usable openly licensed web image"):
        WebSource(settings, ClassStore(settings.cache_dir / "classes")).collect("tomato", 3, quiet())


def test_label_keys_are_safe_and_case_free():
    assert label_key("Traffic Light") == label_key("traffic  light")
    assert "/" not in label_key("../etc/passwd") and label_key("../etc/passwd").startswith("etc-passwd-")
