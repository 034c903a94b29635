# The two commands of the README:  `make run`  (the main job end to end)  and  `make test`.
# Both create .venv and install fer-batch into it on first use.

PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data/ckplus48# labeled folder to fine-tune the shipped model on
ARCHIVE ?= ../shared/data# images and videos to annotate
RUN ?= runs/main# where the fine-tuned model, the annotations and the report go
MODEL ?= default# the model that annotates: the shipped one (knows neutral; MODEL.md)
TRAIN_ARGS ?=# e.g. TRAIN_ARGS="--epochs 2" for a quicker model
ANNOTATE_ARGS ?=
TEST_WORKERS ?= 2# pytest workers of make test (0: one process)

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test browser clean

# one install: the default model and CenterFace's weights ship in the package
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# transfer learning as the paper does it (its recipe and metrics), from the shipped
# FER2013 model; then the archive is annotated by MODEL (README: which model and why)
run: setup
	$(BIN)/fer-batch train $(strip $(DATA)) --pretrained default \
		--output $(strip $(RUN))/model $(TRAIN_ARGS)
	$(BIN)/fer-batch annotate $(strip $(ARCHIVE)) --model $(strip $(MODEL)) \
		--output $(strip $(RUN))/annotations --incremental $(ANNOTATE_ARGS)
	$(BIN)/fer-batch report $(strip $(RUN))/annotations

# headless Chromium for the report's rendering test (Debian package; skipped when not root)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the report rendering test will be skipped"; }

# two pytest workers, each with its own local Ray, take whole modules (tests/conftest.py:
# the longest first): one alone leaves a core idle while a run starts actors or commits
test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs .pytest_cache
