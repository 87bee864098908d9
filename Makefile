# The two commands: `make reproduce` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist); each test file runs whole in one of them.
TEST_JOBS ?= 2
# Stage commands call `python` and `dvc`: the ones in .venv. No usage reports are sent.
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: reproduce test test-fast cost clean-venv

# pip byte-compiles every installed module one file at a time (55 s of a 90 s set-up on 2
# cores); compileall does the same on every core (the set-up then takes 53 s). The .pyc files
# must exist: with PYTHONDONTWRITEBYTECODE set, as on some CI machines, each stage would
# otherwise compile torch again. A file that does not compile (torch's Python 3.12 test
# helper) is skipped, as pip skips it. Left out, half of the 16,000 files (14 s instead of
# 25 s on 2 cores): the packages' own test suites, torch.compile's stack (torch._inductor,
# _dynamo, sympy, networkx, mpmath), pip, DVC's experiment queue (celery) and the idc tests'
# local S3 server (moto, botocore), which no stage imports; Python compiles what is imported.
COMPILE_SKIP := /tests?/|/site-packages/(sympy|mpmath|networkx|pip|celery|moto|botocore)/|/site-packages/torch/(_inductor|onnx|_dynamo|utils/benchmark)/

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	$(BIN)/python -m compileall -qq -j 0 -x '$(COMPILE_SKIP)' "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	$(BIN)/python -m pip install --quiet --no-compile --no-deps --no-build-isolation -e .
	$(BIN)/python -m chestssl.data.base_ct fetch
	touch $(STAMP)

# Runs the whole DAG (download -> preprocess -> pretrain -> finetune -> evaluate -> report),
# its stages forked from a process that has imported torch and MONAI once (chestssl/preload.py).
reproduce: $(STAMP)
	@test -d .git || { echo "error: 'make reproduce' needs a git checkout (dvc tracks params and locks in git); run 'git init' first or clone the repository"; exit 1; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m chestssl.preload run -- $(BIN)/dvc repro

# Unit tests, then the end-to-end pipeline tests (marked slow).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# Unit tests only.
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m "not slow"

# What the full protocol (params/lidc-full.yaml) costs: every training stage measured at full
# size on a few phantom scans, steps for the whole LIDC-IDRI -> reports/cost.md, reports/cost.csv.
# `make cost COST_ARGS="--gpu H100-SXM --utilisation 0.4"` changes the estimate's GPU.
cost: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m chestssl.cost $(COST_ARGS)

clean-venv:
	rm -rf $(VENV)
