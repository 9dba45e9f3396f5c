# Entry points. Each target installs what it needs into .venv first (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
# Modules held to a complexity limit (mccabe, [tool.ruff.lint.mccabe] in pyproject.toml): the orchestration.
LINT_COMPLEXITY := ckptstore/manager.py ckptstore/catalog.py ckptstore/tiers.py ckptstore/dist.py ckptstore/save ckptstore/restore

.PHONY: install test test-all lint demo tutorial bench bench-quick clean

install:
	@bash scripts/bootstrap.sh

# The test command (README, .ci/run): lint, then the suite (slow soak variants excluded).
test: install
	$(VENV)/bin/ruff check ckptstore tests benchmarks examples
	$(VENV)/bin/ruff check --select C901 $(LINT_COMPLEXITY)
	$(PY) -m pytest -q

# Also the slow soak variants.
test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check ckptstore tests benchmarks examples
	$(VENV)/bin/ruff check --select C901 $(LINT_COMPLEXITY)

# The main job: DDP training on 2 CPU ranks (torchrun), SIGTERM mid-run, resume from the latest step, and a
# bit-exact comparison with an uninterrupted run. STORE=s3 checkpoints to a moto S3 server on 127.0.0.1.
STORE ?= local
demo: install
	$(PY) examples/train.py demo --store $(STORE)

# The seed tutorial, single process: checkpoint every epoch, restore into fresh objects, continue, compare.
tutorial: install
	$(PY) examples/tutorial.py --root ./checkpoints/tutorial

bench: install
	@CKPTSTORE_EXTRAS=test,bench bash scripts/bootstrap.sh
	$(PY) -m benchmarks.run

bench-quick: install
	@CKPTSTORE_EXTRAS=test,bench bash scripts/bootstrap.sh
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
