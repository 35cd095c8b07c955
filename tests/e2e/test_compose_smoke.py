"""docker-compose.yml, run without Docker: each service's own command, environment and health check, natively.

There is no container engine on the machines that run these tests, so the file is checked two ways: against the
compose-spec JSON schema (check-jsonschema's vendored copy; `docker compose config` too, where it exists), and by
starting every service of ours as a process with exactly the command, environment and health check the file
gives it, hosts and ports moved onto this machine and DATABASE_URL pointed at a fresh test database.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from imagegen.job.v1 import job_service_pb2 as pb
from pydantic import AliasChoices

from generator_service.config import GeneratorSettings
from imagegen_client import ImageGenClient, RetryPolicy
from imagegen_common.dev_tokens import mint_token
from job_service.config import JobSettings
from tests.support.database import create_database, drop_database
from tests.support.processes import ROOT, free_port

COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error}, over the parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise ValueError(f"{name}: {arg}")
        return ""

    return _VARIABLE.sub(one, value).replace("$$", "$")


# The two secrets the file requires (no public defaults): what a user puts in .env.
REQUIRED = {"SUPABASE_JWT_SECRET": "compose-test-jwt-secret-" + "x" * 16, "GEN_AUTH_TOKEN": "compose-test-token"}


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())  # resolves the YAML anchors and << merges
    return dict(interpolate(loaded, REQUIRED if env is None else env))


def seconds(duration: str) -> float:
    """A compose duration such as "75s", "1m30s"."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unexpected duration {duration!r}"
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


def test_compose_file_validates_against_the_compose_spec() -> None:
    checked = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        config = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, check=False
        )
        assert config.returncode == 0, config.stderr


def test_compose_requires_the_jwt_secret_and_the_generator_token() -> None:
    for missing in REQUIRED:
        for value in (None, ""):  # unset, or set to nothing
            env = {k: v for k, v in REQUIRED.items() if k != missing} | ({missing: value} if value is not None else {})
            with pytest.raises(ValueError, match=f"{missing}: set {missing} "):
                compose(env)
    services = compose()["services"]
    assert services["job"]["environment"]["SUPABASE_JWT_SECRET"] == REQUIRED["SUPABASE_JWT_SECRET"]
    assert services["generator"]["environment"]["GEN_AUTH_TOKEN"] == REQUIRED["GEN_AUTH_TOKEN"]
    assert "GEN_ALLOW_PLAINTEXT" in services["generator"]["environment"]  # explicit: it listens beyond loopback
    assert "JOB_ALLOW_PLAINTEXT" in services["job"]["environment"]


def test_compose_publishes_on_loopback_unless_told_otherwise() -> None:
    published = {name: s.get("ports", []) for name, s in compose()["services"].items()}
    assert published["job"] == ["127.0.0.1:50051:50051", "127.0.0.1:9101:9101"]
    assert published["images"] == ["127.0.0.1:8088:8088"]
    assert not published["generator"] and not published["postgres"] and not published["migrate"]
    moved = compose(REQUIRED | {"IMAGEGEN_BIND": "0.0.0.0", "IMAGEGEN_JOB_PORT": "6000"})["services"]
    assert moved["job"]["ports"][0] == "0.0.0.0:6000:50051"
    # Published metrics must listen beyond the container's loopback to be reachable through the port.
    assert moved["job"]["environment"]["JOB_METRICS_HOST"] == "0.0.0.0"


def test_compose_stops_each_service_after_its_drain_not_before() -> None:
    services = compose()["services"]
    for name, grace in (("generator", "GEN_SHUTDOWN_GRACE_SECONDS"), ("job", "JOB_SHUTDOWN_GRACE_SECONDS")):
        drain = float(services[name]["environment"][grace])
        assert seconds(services[name]["stop_grace_period"]) >= drain + 10, name


def test_compose_image_urls_name_the_image_server_not_a_replica() -> None:
    services = compose()["services"]
    generator, images = services["generator"], services["images"]
    assert images["command"] == ["python", "-m", "generator_service", "serve-images"]
    assert images.get("deploy", {}).get("replicas", 1) == 1
    assert generator["environment"]["GEN_STORAGE_PUBLIC_BASE_URL"] == "http://localhost:8088"
    assert images["ports"][0].endswith(":8088:8088") and images["environment"]["GEN_STORAGE_HTTP_PORT"] == "8088"
    # Both see the one volume, at the folder each reads as its storage; the image server only reads it.
    assert "images:/data/storage" in generator["volumes"]
    assert "images:/data/storage:ro" in images["volumes"]
    assert generator["environment"]["GEN_STORAGE_DIR"] == images["environment"]["GEN_STORAGE_DIR"] == "/data/storage"


def test_compose_runs_our_containers_locked_down() -> None:
    services = compose()["services"]
    for name in ("migrate", "generator", "images", "job"):
        assert services[name]["read_only"] is True, name
        assert services[name]["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in services[name]["security_opt"], name


def test_compose_wires_what_the_services_expect() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "generator", "images", "job"}
    assert services["migrate"]["command"] == ["python", "-m", "job_service", "migrate"]
    assert services["generator"]["deploy"]["replicas"] == 2
    assert services["generator"]["deploy"]["mode"] == "replicated"
    job_env = services["job"]["environment"]
    assert job_env["JOB_GENERATOR_TARGET"] == "dns:///generator:50052"
    # Streams are placed anew within seconds, so a generator replica that restarts gets its share soon (the
    # default 60 s left it 4 of 16 jobs 12 s after a restart in make compose-test; 10 s gives it 8).
    assert float(job_env["JOB_GENERATOR_STREAM_MAX_AGE_SECONDS"]) <= 15
    assert job_env["JOB_GENERATOR_TOKEN"] == services["generator"]["environment"]["GEN_AUTH_TOKEN"]
    assert services["job"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["job"]["depends_on"]["generator"]["condition"] == "service_healthy"
    for name in ("job", "generator"):
        assert services[name]["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "imagegen_common.healthcheck"]
        assert services[name]["env_file"] == [{"path": ".env", "required": False}]
    assert services["images"]["healthcheck"]["test"][:2] == ["CMD", "python"]
    # Every name the file sets is a real setting (a typo would be silently ignored by pydantic-settings).
    known = set(env_names(JobSettings)) | set(env_names(GeneratorSettings))
    for name in ("migrate", "generator", "images", "job"):
        unknown = set(services[name]["environment"]) - known
        assert not unknown, f"{name} sets unknown variables {unknown}"


def env_names(cls: type[JobSettings] | type[GeneratorSettings]) -> list[str]:
    names = []
    for name, field in cls.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            names += [str(choice) for choice in field.validation_alias.choices]
        else:
            names.append(f"{cls.model_config.get('env_prefix', '')}{name}".upper())
    return names


def test_env_example_documents_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^# ([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))
    for cls in (JobSettings, GeneratorSettings):
        for name, field in cls.model_fields.items():
            primary = env_names_of(cls, name, field)
            assert primary in documented, f"{primary} is missing from .env.example (python scripts/gen_env_example.py)"


def env_names_of(cls: Any, name: str, field: Any) -> str:
    if isinstance(field.validation_alias, AliasChoices):
        return str(field.validation_alias.choices[0])
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def test_dockerfile_is_multi_stage_non_root_and_installs_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) == 2
    assert "uv sync --frozen --no-dev" in text
    user = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and ".data" in ignored


# -- the services, natively -----------------------------------------------------------------------------------------


class Started:
    def __init__(self, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.process, self.log = name, process, log

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def native(command: list[str]) -> list[str]:
    """The container's `python` is this virtualenv's."""
    return [sys.executable if part == "python" else part for part in command]


def child_env(service_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_", "GEN_")) and k != "DATABASE_URL"}
    return {**env, **service_env, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def wait_healthy(started: Started, healthcheck: list[str], timeout: float = 60.0, expect: str = "SERVING") -> None:
    assert healthcheck[0] == "CMD"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise AssertionError(f"{started.name} exited with {started.process.returncode}:\n{started.tail()}")
        probe = subprocess.run(native(healthcheck[1:]), capture_output=True, text=True, timeout=30, check=False)
        last = probe.stdout.strip() + probe.stderr.strip()
        if probe.returncode == 0:
            assert last == expect
            return
        time.sleep(0.3)
    raise AssertionError(f"{started.name} never became healthy ({last}):\n{started.tail()}")


@pytest.fixture
def fresh_database(pg_server: str) -> Iterator[str]:
    url = asyncio.run(create_database(pg_server))
    yield url
    asyncio.run(drop_database(pg_server, url))


def test_every_compose_service_starts_natively_and_reports_serving(fresh_database: str, tmp_path: Path) -> None:
    services = compose()["services"]
    ours = [name for name, service in services.items() if "build" in service]
    assert ours == ["migrate", "generator", "images", "job"]
    started: list[Started] = []

    def start(name: str, env: dict[str, str], suffix: str = "") -> Started:
        log = tmp_path / f"{name}{suffix}.log"
        process = subprocess.Popen(
            native(services[name]["command"]),
            env=child_env(env),
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(Started(f"{name}{suffix}", process, log))
        return started[-1]

    try:
        # The one-shot migrate: exit 0 on a fresh database.
        migrate_env = {**services["migrate"]["environment"], "DATABASE_URL": fresh_database}
        migrate = start("migrate", migrate_env)
        assert migrate.process.wait(timeout=120) == 0, migrate.tail()
        assert "applied" in migrate.log.read_text()

        # The one image server over the shared storage folder (the compose volume), on a port of this machine.
        images = services["images"]
        images_port = free_port()
        images_env = {
            **images["environment"],
            "GEN_STORAGE_DIR": str(tmp_path / "storage"),
            "GEN_STORAGE_HTTP_HOST": "127.0.0.1",
            "GEN_STORAGE_HTTP_PORT": str(images_port),
        }
        images_process = start("images", images_env)
        wait_healthy(images_process, localize(images["healthcheck"]["test"], 8088, images_port), expect="")

        # Two generator replicas, each on its own ports, sharing one storage folder as the compose volume does.
        generator = services["generator"]
        generator_ports = []
        for replica in range(generator["deploy"]["replicas"]):
            port = free_port()
            env = {
                **generator["environment"],
                "GEN_HOST": "127.0.0.1",
                "GEN_PORT": str(port),
                "GEN_STORAGE_DIR": str(tmp_path / "storage"),
                "GEN_STORAGE_HTTP_HOST": "127.0.0.1",
                "GEN_STORAGE_HTTP_PORT": str(free_port()),
                "GEN_METRICS_PORT": str(free_port()),
            }
            # As compose's http://localhost:8088: the image server's published port, not this replica's.
            env["GEN_STORAGE_PUBLIC_BASE_URL"] = generator["environment"]["GEN_STORAGE_PUBLIC_BASE_URL"].replace(
                ":8088", f":{images_port}"
            )
            replica_process = start("generator", env, f"-{replica + 1}")
            wait_healthy(replica_process, localize(generator["healthcheck"]["test"], 50052, port))
            generator_ports.append(port)

        job = services["job"]
        job_port = free_port()
        job_env = {
            **job["environment"],
            "DATABASE_URL": fresh_database,
            "JOB_HOST": "127.0.0.1",
            "JOB_PORT": str(job_port),
            # dns:///generator:50052 resolves to every replica; here the replicas are these two addresses.
            "JOB_GENERATOR_TARGET": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in generator_ports),
            "JOB_METRICS_PORT": str(free_port()),
        }
        job_process = start("job", job_env)
        wait_healthy(job_process, localize(job["healthcheck"]["test"], 50051, job_port))

        # Wired as compose wires it: the token on the internal hop, jobs spread over both replicas.
        async def run_jobs() -> list[pb.Job]:
            async with ImageGenClient(
                f"127.0.0.1:{job_port}",
                mint_token(job["environment"]["SUPABASE_JWT_SECRET"], user_id=str(uuid.uuid4())),
                retry=RetryPolicy(attempts=1),
            ) as client:
                created = [await client.create_job(f"compose {i}", sample_count=1) for i in range(4)]
                return [await client.wait(j.id, timeout=60) for j in created]

        try:
            done = asyncio.run(run_jobs())
        except Exception as exc:
            raise AssertionError(f"job service: exit {job_process.process.poll()}\n{job_process.tail()}") from exc
        assert [j.state for j in done] == [pb.JOB_STATE_COMPLETED] * 4, job_process.tail()
        served = [s for s in started if s.name.startswith("generator-")]
        for replica_process in served:
            assert "GeneratorService/Generate" in replica_process.log.read_text(), "round robin reaches each replica"
        # Every image downloads from the image server, whichever replica stored it.
        for finished in done:
            for image in finished.images:
                assert image.url.startswith(f"http://localhost:{images_port}/storage/v1/object/public/"), image.url
                with urllib.request.urlopen(image.url.replace("localhost", "127.0.0.1"), timeout=10) as response:
                    assert len(response.read()) == image.size_bytes
    finally:
        for s in reversed(started):
            if s.process.poll() is None:
                s.process.terminate()
                try:
                    s.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    s.process.kill()


def localize(test: list[str], compose_port: int, port: int) -> list[str]:
    return [
        part.replace(f"127.0.0.1:{compose_port}", f"127.0.0.1:{port}").replace(
            f"'127.0.0.1', {compose_port}", f"'127.0.0.1', {port}"
        )
        for part in test
    ]
