# The two commands of the README. Each creates .venv if missing and installs the project into it.
# GPU users keep their own CUDA build of torch with:  make bench PIP_CONSTRAINTS=
VENV ?= .venv
PYTHON ?= python3
PIP_CONSTRAINTS ?= -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: bench test test-all gpu-check kernels asv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINTS) -e ".[all]"
	touch $@

# The quick suite on the best available device: comparison table on stdout, rows in results/.
bench: $(STAMP)
	$(VENV)/bin/lossbench run --suite quick $(ARGS)

# The tests. pytest exits 5 when it collects nothing: make fails on it like on any non-zero status.
# --benchmark-disable: tests/test_benchmarks.py makes one untimed call per case (timed, it is
# `pytest --benchmark-only`, which refuses --benchmark-disable: hence here and not in pyproject's addopts),
# on small cases in float32: every implementation is still called, memory and accuracy still filled, at a
# quarter of the default grid's compilations and sizes.
TEST_ENV := LOSSBENCH_SHAPES=256x100,64x32x512 LOSSBENCH_DTYPES=float32
# The fast tier: every test not marked slow (real sweeps in child processes, git worktrees, asv, every
# Triton variant compiled); it still touches every module of lossbench (tests/tiers.py fails it if not).
test: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest --benchmark-disable -m "not slow" $(PYTEST_ARGS)

# Everything, the slow tests included: what CI (.ci/run) runs.
test-all: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest --benchmark-disable $(PYTEST_ARGS)

# On a GPU machine, with the CUDA build of torch already in $(VENV) (PIP_CONSTRAINTS= keeps it):
# the CUDA tests (compiled Triton kernels, ours and the peers', through the accuracy checks), then the
# gpu suite, whose run file lands in results/. Commit that file.
gpu-check: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m cuda $(PYTEST_ARGS)
	$(VENV)/bin/lossbench run --suite gpu --device cuda $(ARGS)

# asv over the registry's suites (benchmarks/) in this environment, results in results/asv/ under this
# commit (asv saves nothing for an existing environment without --set-commit-hash), raw samples kept.
# ASV_ARGS="--quick" for one sample each; ASV_ARGS="-b '^losses\.CE\.'" for one family.
asv: $(STAMP)
	$(VENV)/bin/asv machine --yes
	$(VENV)/bin/asv run --python=same --set-commit-hash HEAD --record-samples $(ASV_ARGS)

# Registers, spills and shared memory of every Triton kernel variant, compiled for sm_80 and sm_90 (no GPU needed).
kernels: $(STAMP)
	$(VENV)/bin/lossbench kernels $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
