"""docker-compose.yml: valid for docker-compose, and speaking the same setting names as the code."""

import os
import shutil
import subprocess

import pytest
import yaml

from usam_backend.core.settings import documented_settings

from helpers import ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_docker_compose_accepts_the_file():
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("USAM_REQUIRE_DOCKER_COMPOSE"):
            pytest.fail("docker-compose is not installed: run `make test` (it installs Debian's docker-compose)")
        pytest.skip("docker-compose is not installed here; `make test` installs it")
    done = subprocess.run([binary, "-f", "docker-compose.yml", "config", "--quiet"], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    profiles = subprocess.run(
        [binary, "-f", "docker-compose.yml", "--profile", "label-studio", "config", "--services"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert set(profiles.stdout.split()) == {"redis", "backend", "worker", "label-studio"}


def test_services_share_one_environment_of_known_names(compose):
    services = compose["services"]
    backend, worker = services["backend"], services["worker"]
    assert backend["environment"] == worker["environment"] == compose["x-usam-env"]
    known = {name for name, _, _ in documented_settings()}
    assert set(compose["x-usam-env"]) <= known, set(compose["x-usam-env"]) - known
    assert compose["x-usam-env"]["REDIS_URL"].startswith("redis://redis:")
    assert worker["command"] == ["usam", "worker"] and backend["command"][:2] == ["usam", "serve"]


def test_worker_reserves_a_gpu_and_label_studio_accepts_the_backend(compose):
    (device,) = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    label_studio = compose["services"]["label-studio"]["environment"]
    assert label_studio["ML_BLOCK_LOCAL_IP"] == "false" and label_studio["SSRF_PROTECTION_ENABLED"] == "false"
    for service in ("backend", "worker"):
        mounts = {volume.split(":")[1] for volume in compose["services"][service]["volumes"]}
        assert mounts == {"/data/models", "/data/cache"}
