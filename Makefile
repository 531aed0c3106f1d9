# usam: `make serve` runs the service, `make test` runs every check. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
# Label Studio for the end-to-end tests lives in its own virtualenv, outside the project's, and is
# kept between runs.
LABEL_STUDIO_VERSION := 1.23.2
LABEL_STUDIO_VENV ?= $(HOME)/.cache/usam-test/label-studio-$(LABEL_STUDIO_VERSION)
LABEL_STUDIO := $(LABEL_STUDIO_VENV)/bin/label-studio

.PHONY: serve test lint unit venv label-studio system-packages clean

venv: $(DEPS)

$(DEPS): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

$(LABEL_STUDIO):
	rm -rf $(LABEL_STUDIO_VENV)
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet label-studio==$(LABEL_STUDIO_VERSION)

label-studio: $(LABEL_STUDIO)

# Real services for the tests: Redis for the RQ workers, docker-compose to validate the compose file,
# ffmpeg as the reference for how players show a video; libGL and GLib, which OpenCV loads at import;
# Chromium, which the browser tests drive through playwright (no browser download).
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	ldconfig -p | grep -q 'libGL.so.1 ' || missing="$$missing libgl1"; \
	ldconfig -p | grep -q 'libgthread-2.0.so.0 ' || missing="$$missing libglib2.0-0"; \
	if [ -n "$$missing" ]; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing$$missing"; \
		$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing; \
	fi

serve: $(DEPS)
	$(BIN)/usam serve

lint: $(DEPS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(DEPS) $(LABEL_STUDIO) system-packages
	USAM_TEST_LABEL_STUDIO=$(LABEL_STUDIO) USAM_REQUIRE_LABEL_STUDIO=1 USAM_REQUIRE_REDIS=1 USAM_REQUIRE_FFMPEG=1 \
		USAM_REQUIRE_DOCKER_COMPOSE=1 USAM_REQUIRE_S3=1 USAM_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

test: lint unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
