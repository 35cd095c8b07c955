# imagegen: `make run` starts everything on embedded defaults; `make test` runs every check and test.
# Both set up what they need first (a private uv in .tools/, the locked dependencies in .venv/).

PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.synced

.DEFAULT_GOAL := help
.PHONY: help setup proto proto-check schema schema-check lint typecheck test test-fast compose-test run bench clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (as on these machines) no .pyc is ever
# written, and every process (each service a test or the bench starts) compiled what it imported: 1.9-2.4 s to
# import both services and Pillow's plugins, 1.2-1.5 s with the compiled files.
$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --quiet
	@touch $(STAMP)

setup: $(STAMP) ## Install the locked dependencies into .venv (needs only python3 >= 3.11)

proto: $(STAMP) ## Regenerate gen/ from protos/
	$(PY) scripts/gen_protos.py

proto-check: $(STAMP) ## Fail when protos/ and gen/ disagree, buf lint finds a problem, or v1 breaks (docs/api-compatibility.md)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking --against protos/released/imagegen-v1.json
	$(PY) scripts/check_generated.py

schema: $(STAMP) ## Regenerate supabase/schema.sql from supabase/migrations/ (DATABASE_URL's server, else embedded)
	$(PY) scripts/gen_schema.py

schema-check: $(STAMP) ## Fail when supabase/schema.sql differs from what the migrations build (make test checks it too)
	$(PY) scripts/gen_schema.py --check

lint: $(STAMP) ## ruff (lint and format check)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP) ## mypy --strict on the services, the client and the scripts
	$(VENV)/bin/mypy job_service generator_service imagegen_common imagegen_client scripts

test: $(STAMP) proto-check lint typecheck ## Every check, then every test (embedded PostgreSQL unless DATABASE_URL is set)
	$(VENV)/bin/pytest -q

compose-test: $(STAMP) ## Build the image and prove docker-compose.yml with podman (root; ../shared beside the repo)
	bash scripts/compose_test.sh

run: $(STAMP) ## Embedded PostgreSQL + migrations + JobService (:50051) + GeneratorService (:50052)
	$(PY) scripts/run_local.py

bench: $(STAMP) ## The benchmarks; figures in bench/results/latest.json
	$(PY) -m bench

clean: ## Remove the virtualenvs and caches (keeps .data/)
	rm -rf .venv .tools .pytest_cache .ruff_cache .mypy_cache
