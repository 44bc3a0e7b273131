# bincounter: `make demo` and `make test` create .venv themselves on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is reinstalled only when pyproject.toml changes (CI reuses it otherwise).
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml demo/pyproject.toml | cksum | cut -d' ' -f1)
export BINCOUNTER_HOME ?= $(CURDIR)/.bincounter
UI_PORT ?= 5000

.PHONY: help venv browser demo test test-fast imports docs ui compile bench lint clean image image-cuda image-serve image-test image-test-cuda image-test-serve

help:
	@echo "make demo      whole pipeline end to end, offline (synthetic data, local S3, MLflow, model server)"
	@echo "make test      the import rules, the docs site (strict), unit and integration tests"
	@echo "make docs      the documentation site in site/ (MkDocs, strict)"
	@echo "make ui        MLflow UI on http://127.0.0.1:$(UI_PORT) over $(BINCOUNTER_HOME)/mlflow.db"
	@echo "make compile   pipeline.yaml for Kubeflow Pipelines"
	@echo "make bench     speed benchmarks (bench/)"
	@echo "make image     CPU image (docker, or buildah where no docker daemon answers); make image-cuda: CUDA image"
	@echo "make image-serve       the serving image (ONNX Runtime, no torch: dockerfiles/Dockerfile.serve)"
	@echo "make image-test        builds the CPU and serving images if the sources changed, then tests both from inside (incl. the demo)"
	@echo "make image-test-cuda   the same for the CUDA image (torch is a CUDA build, every module imports)"

$(STAMP): pyproject.toml demo/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,sagemaker]' -e ./demo
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

demo: venv
	$(VENV)/bin/bincounter demo

# The one-bin page is tested in a real headless browser: Debian's chromium, installed when missing
# (as root, or the browser test skips and says so).
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed: tests/serving/test_page.py's browser test will skip"; }

# The architecture's import rules (pyproject.toml, [tool.importlinter]; docs/architecture.md).
imports: venv
	$(VENV)/bin/lint-imports

# Strict: a broken link, a missing page or an API page whose module moved fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

test: venv browser imports docs
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

ui: venv
	@mkdir -p $(BINCOUNTER_HOME)
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(BINCOUNTER_HOME)/mlflow.db \
		--default-artifact-root $(BINCOUNTER_HOME)/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

compile: venv
	$(VENV)/bin/bincounter pipeline compile --out pipeline.yaml

bench: venv
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: venv
	$(VENV)/bin/yamllint manifests
	$(VENV)/bin/hadolint dockerfiles/Dockerfile dockerfiles/Dockerfile.cuda dockerfiles/Dockerfile.sagemaker dockerfiles/Dockerfile.serve

# Images: dockerfiles/build.py picks docker or buildah, makes a base where the pinned one cannot
# be pulled, passes this machine's pip settings as build secrets, and tags each image by a
# digest of its build context (see docs/images.md). Standard library only: no venv needed.
image:
	$(PYTHON) dockerfiles/build.py build cpu

image-cuda:
	$(PYTHON) dockerfiles/build.py build cuda

image-serve:
	$(PYTHON) dockerfiles/build.py build serve

image-test:
	$(PYTHON) dockerfiles/build.py test cpu
	$(PYTHON) dockerfiles/build.py test serve

image-test-serve:
	$(PYTHON) dockerfiles/build.py test serve

image-test-cuda:
	$(PYTHON) dockerfiles/build.py test cuda

clean:
	rm -rf $(BINCOUNTER_HOME) pipeline.yaml .pytest_cache site
