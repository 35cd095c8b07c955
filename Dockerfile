# syntax=docker/dockerfile:1
# One image for both services and the migrate step (docker-compose.yml picks the command):
#   python -m job_service serve | python -m job_service migrate | python -m generator_service [serve-images]
# Build: docker build -t imagegen:local .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: resolve nothing, install exactly uv.lock into /app/.venv --------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# The Makefile's uv version, from PyPI (no other download source needed).
RUN pip install --no-cache-dir uv==0.13.8
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# Dependencies first: this layer is rebuilt only when the lock file changes. No dev group (tests, linters,
# buf), and no pgserver (the embedded PostgreSQL for laptops; containers always get a DATABASE_URL).
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --no-install-package pgserver
COPY gen ./gen
COPY imagegen_common ./imagegen_common
COPY job_service ./job_service
COPY generator_service ./generator_service
COPY imagegen_client ./imagegen_client
COPY supabase/migrations ./supabase/migrations
RUN uv sync --frozen --no-dev --no-install-package pgserver

# --- runtime: the venv and the code, no compilers, no uv, not root -----------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 imagegen \
    && useradd --system --uid 10001 --gid imagegen --no-create-home --shell /usr/sbin/nologin imagegen \
    && mkdir -p /data/storage \
    && chown imagegen:imagegen /data/storage
WORKDIR /app
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GEN_STORAGE_DIR=/data/storage
USER imagegen
# JobService gRPC, GeneratorService gRPC, local storage HTTP, metrics (as docker-compose.yml sets them).
EXPOSE 50051 50052 8088 9101 9102
CMD ["python", "-m", "job_service", "serve"]
