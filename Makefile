# The two README commands: `make demo` and `make test`. Everything they need is set up here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST_DIR ?= .host/ComfyUI
STAMP := $(VENV)/.lora-core-deps

.PHONY: setup host test demo bench serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# CPU torch from this machine's disk first, so nothing later pulls a different build.
$(STAMP): $(PY) requirements.txt requirements/host.txt requirements/test.txt
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/host.txt -r requirements/test.txt -r requirements.txt
	touch $(STAMP)

host: $(STAMP)
	PY=$(PY) HOST_DIR=$(HOST_DIR) ./scripts/setup_host.sh

setup: $(STAMP) host
	@# Browser tests drive Debian's chromium (never a downloaded browser build) with Playwright.
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing Debian's chromium for tests/test_browser.py"; \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m demo

bench: setup
	$(PY) -m bench

serve: setup
	$(PY) -m demo --serve

clean:
	rm -rf $(VENV) .host test-artifacts demo-output
