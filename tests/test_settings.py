import dataclasses
from pathlib import Path

import pytest

from usam_backend.core.errors import ConfigurationError
from usam_backend.core.settings import Settings, documented_settings, env_name

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.sam_type == "vit_t"
    assert settings.points == 100
    assert settings.grid_side == 10
    assert settings.device == "auto"


def test_every_field_is_read_from_its_variable():
    env = {
        "USAM_SAM_TYPE": "tiny",
        "USAM_SAM_CHECKPOINT": "/ckpt/sam.pth",
        "USAM_DEVICE": "cuda:1",
        "USAM_POINTS": "64",
        "USAM_SCORE_THRESHOLD": "0.7",
        "USAM_NMS_IOU": "0.3",
        "USAM_DECODE_CHUNK": "16",
        "USAM_RUNTIME": "openvino",
        "USAM_CACHE_DIR": "/tmp/usam-cache",
        "USAM_MODEL_DIR": "/srv/heads",
        "USAM_EMBEDDING_CACHE_SIZE": "3",
        "USAM_EMBEDDING_CACHE_DISK": "yes",
        "USAM_MAX_IMAGE_PIXELS": "1000",
        "USAM_MAX_IMAGE_BYTES": "2000",
        "USAM_MAX_VIDEO_BYTES": "3000",
        "USAM_FETCH_TIMEOUT": "2.5",
        "LABEL_STUDIO_URL": "http://ls:8080",
        "LABEL_STUDIO_API_KEY": "k" * 40,
        "USAM_ALLOWED_HOSTS": "images.example.com, *.cdn.example.org",
        "BASIC_AUTH_USER": "ann",
        "BASIC_AUTH_PASS": "pw",
        "USAM_WEBHOOK_SECRET": "hook",
        "USAM_AUTO_TRAIN": "false",
        "USAM_RETRAIN_EVERY": "3",
        "USAM_FEEDBACK_IOU": "0.6",
        "USAM_PREDICT_BUDGET": "30",
        "USAM_PREANNOTATE_CHUNK": "100",
        "USAM_VIDEO_STRIDE": "3",
        "USAM_VIDEO_MAX_FRAMES": "500",
        "USAM_VIDEO_CHUNK": "120",
        "USAM_SEQUENCE_MAX_FRAMES": "50",
        "USAM_REFINE": "both",
        "USAM_KEEP_PROJECT_HEADS": "5",
        "USAM_MAX_PENDING_PREDICTIONS": "2",
        "REDIS_URL": "redis://redis:6379/0",
        "USAM_QUEUE": "gpu-jobs",
        "USAM_JOB_TIMEOUT": "600",
        "USAM_DATA_SOURCE": "folder",
        "USAM_DATA_DIR": "/data/classes",
        "USAM_IMAGES_PER_CLASS": "12",
        "USAM_SEED": "7",
        "USAM_TRAIN_EPOCHS": "9",
        "USAM_SD_MODEL": "stabilityai/sd-turbo",
        "USAM_SD_STEPS": "1",
        "USAM_SD_GUIDANCE": "0",
        "USAM_SD_SIZE": "512",
        "USAM_SD_BATCH": "8",
        "USAM_PROMPT_TEMPLATE": "a close-up photo of a {label}",
        "USAM_OPENVERSE_URL": "http://replay:1",
        "USAM_COMMONS_URL": "http://replay:2/w/api.php",
        "USAM_WEB_LICENSES": "cc0",
        "USAM_WEB_MIN_SIDE": "64",
        "USAM_WEB_INTERVAL": "0.5",
    }
    settings = Settings.from_env(env)
    assert {env_name(f.name) for f in dataclasses.fields(Settings)} == set(env)
    assert settings.allowed_hosts == ("images.example.com", "*.cdn.example.org")
    assert settings.fetch_timeout == 2.5 and settings.label_studio_url == "http://ls:8080"
    assert "k" * 40 not in repr(settings) and "hook" not in repr(settings)  # secrets stay out of logs
    assert settings.sam_checkpoint == Path("/ckpt/sam.pth")
    assert (settings.video_stride, settings.video_max_frames, settings.video_chunk) == (3, 500, 120)
    assert settings.max_video_bytes == 3000
    assert settings.auto_train is False and settings.data_dir == Path("/data/classes")
    assert (settings.sd_steps, settings.sd_guidance, settings.seed) == (1, 0.0, 7)
    assert (settings.points, settings.score_threshold, settings.nms_iou) == (64, 0.7, 0.3)
    assert settings.embedding_cache_disk is True
    assert settings.model_dir == Path("/srv/heads")
    assert (settings.retrain_every, settings.feedback_iou, settings.predict_budget) == (3, 0.6, 30.0)
    assert settings.preannotate_chunk == 100


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("USAM_SAM_TYPE", "vit_x", "one of"),
        ("USAM_POINTS", "50", "perfect square such as 49 or 64"),
        ("USAM_POINTS", "ten", "not valid"),
        ("USAM_SCORE_THRESHOLD", "1.5", "between 0 and 1"),
        ("USAM_DEVICE", "tpu", "auto, cpu, cuda"),
        ("USAM_EMBEDDING_CACHE_DISK", "maybe", "true or false"),
        ("USAM_FETCH_TIMEOUT", "0", "positive number of seconds"),
        ("USAM_DATA_SOURCE", "s3", "synthetic, web, folder"),
        ("USAM_PROMPT_TEMPLATE", "a photo", "containing {label}"),
        ("USAM_SD_BATCH", "0", "a positive number"),
        ("USAM_VIDEO_STRIDE", "0", "a positive number of frames"),
        ("USAM_MAX_VIDEO_BYTES", "0", "a positive number of bytes"),
    ],
)
def test_bad_values_name_the_variable(name, value, expected):
    with pytest.raises(ConfigurationError, match=name) as info:
        Settings.from_env({name: value})
    assert expected in str(info.value)


def test_basic_auth_needs_both_halves():
    with pytest.raises(ConfigurationError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "ann"})


def test_replace_ignores_none_and_validates():
    settings = Settings.from_env({})
    assert settings.replace(points=None, sam_type="tiny").sam_type == "tiny"
    with pytest.raises(ConfigurationError):
        settings.replace(points=3)


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for name, default, _doc in documented_settings():
        assert f"`{name}`" in readme, f"{name} is not documented in README.md"
        assert default in readme
