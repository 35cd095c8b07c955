#!/usr/bin/env bash
# make compose-test: build the image and run docker-compose.yml with podman, then prove through the published ports
# what a user relies on (tests/compose/prove_stack.py). Idempotent and cached between runs on one machine: the
# podman install, its base images and the build's layers stay (../shared/tools/container-runtime.sh); the stack,
# its volumes and its network are removed whatever happens.
#
# Needs root (podman as root, apt for podman the first time) and ../shared beside the repository (CI has it there;
# elsewhere set IMAGEGEN_SHARED_DIR). Docker Compose v2 semantics; the podman-compose differences it works around
# are in docs/deploy.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SHARED=${IMAGEGEN_SHARED_DIR:-$ROOT/../shared}
RUNTIME=$SHARED/tools/container-runtime.sh
[ -x "$RUNTIME" ] || [ -f "$RUNTIME" ] || { echo "compose-test: $RUNTIME not found (set IMAGEGEN_SHARED_DIR)" >&2; exit 2; }
started=$SECONDS
say() { echo "== compose-test [$((SECONDS - started))s] $*" >&2; }

say "podman (cached after the first run)"
# netavark (podman's bridge networks) drives iptables; some images of this machine lack it.
if ! command -v iptables >/dev/null 2>&1; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >&2
fi
eval "$(bash "$RUNTIME")"

say "image imagegen:local (layers cached)"
podman build -q --build-arg PYTHON_IMAGE=localhost/python-base:bookworm -t imagegen:local . >/dev/null

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }
export COMPOSE_PROJECT=imagegen-compose-test
export SUPABASE_JWT_SECRET GEN_AUTH_TOKEN IMAGEGEN_JOB_PORT IMAGEGEN_IMAGES_PORT IMAGEGEN_METRICS_PORT
SUPABASE_JWT_SECRET=$(secret)
GEN_AUTH_TOKEN=$(secret)
IMAGEGEN_JOB_PORT=$(free_port)
IMAGEGEN_IMAGES_PORT=$(free_port)
IMAGEGEN_METRICS_PORT=$(free_port)
export GEN_STORAGE_PUBLIC_BASE_URL=http://127.0.0.1:$IMAGEGEN_IMAGES_PORT
export COMPOSE_FILES="docker-compose.yml tests/compose/compose.test.yml"
compose() { podman-compose -p "$COMPOSE_PROJECT" -f docker-compose.yml -f tests/compose/compose.test.yml "$@"; }

health_loop=
cleanup() {
  status=$?
  [ -z "$health_loop" ] || kill "$health_loop" 2>/dev/null || true
  say "down, with the volumes"
  compose down -v -t 5 >/dev/null 2>&1 || true
  say "compose down returned"
  # Belt and braces: whatever podman-compose left (a failed start can leave a container or volume behind).
  for c in $(podman ps -aq --filter "label=io.podman.compose.project=$COMPOSE_PROJECT"); do podman rm -f "$c" >/dev/null 2>&1 || true; done
  for v in $(podman volume ls -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT"); do podman volume rm -f "$v" >/dev/null 2>&1 || true; done
  podman network rm -f "${COMPOSE_PROJECT}_default" >/dev/null 2>&1 || true
  say "done (exit $status)"
  exit "$status"
}
trap cleanup EXIT INT TERM
compose down -v -t 5 >/dev/null 2>&1 || true  # a run killed before its trap ran

# Healthchecks need a runner without systemd (../shared/tools/README.md); the prover waits for "healthy".
HEALTH_EVERY=2 bash "$RUNTIME" health-loop "$COMPOSE_PROJECT" 1800 &
health_loop=$!

say "the stack, proven through its published ports"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
"$PYTHON" tests/compose/prove_stack.py
