"""What counts as loopback (where plaintext and the development defaults are allowed), and the generator's
refusal to serve unauthenticated callers beyond it."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from generator_service.config import ConfigurationError
from generator_service.server import check_callers_authenticated, start
from imagegen_common.transport import PlaintextRefusedError, check_client, is_loopback_host, target_is_local
from tests.generator.helpers import settings_for

LOOPBACK_HOSTS = ["127.0.0.1", "127.0.0.53", "127.255.255.254", "::1", "[::1]", "localhost"]
OTHER_HOSTS = [
    "0.0.0.0",
    "::",
    "[::]",
    "10.0.0.5",
    "192.168.1.2",
    "::ffff:10.0.0.1",
    "a.localhost",
    "localhost.",
    "ip6-localhost",
    "localhost.example.com",
    "127.0.0.1.nip.io",
    "generator",
    "",
]


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", OTHER_HOSTS)
def test_hosts_that_may_be_elsewhere_are_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    "target",
    [
        "localhost:50052",
        "127.0.0.1:50052",
        "[::1]:50052",
        "dns:///localhost:50052",
        "dns:localhost:50052",
        "dns:///127.0.0.1:50052",
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        "ipv6:[::1]:50052",
        "unix:/run/imagegen/generator.sock",
    ],
)
def test_local_targets(target: str) -> None:
    assert target_is_local(target)
    check_client(target, tls=False, allow_plaintext=None, setting="JOB_ALLOW_PLAINTEXT")


@pytest.mark.parametrize(
    "target",
    [
        "dns://8.8.8.8/localhost:50052",  # that DNS server decides where "localhost" is
        "dns://8.8.8.8:53/127.0.0.1:50052",
        "dns:///generator:50052",
        "api.localhost:50052",
        "ipv4:127.0.0.1:1,10.0.0.2:2",
        "0.0.0.0:50052",
        "generator:50052",
    ],
)
def test_targets_that_may_be_elsewhere_need_tls_or_the_setting(target: str) -> None:
    assert not target_is_local(target)
    with pytest.raises(PlaintextRefusedError, match="JOB_ALLOW_PLAINTEXT"):
        check_client(target, tls=False, allow_plaintext=None, setting="JOB_ALLOW_PLAINTEXT")


async def test_a_generator_beyond_loopback_without_caller_authentication_refuses_to_start(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, host="0.0.0.0", allow_plaintext=True)
    with structlog.testing.capture_logs() as logs, pytest.raises(ConfigurationError) as refused:
        await start(settings)
    message = str(refused.value)
    for setting in ("GEN_HOST=0.0.0.0", "GEN_AUTH_TOKEN", "GEN_TLS_CLIENT_CA", "GEN_ALLOW_UNAUTHENTICATED"):
        assert setting in message
    assert [line["event"] for line in logs if line["log_level"] == "error"] == ["refusing to start"]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"auth_token": "internal-token"}, id="shared-token"),
        pytest.param({"tls_cert": Path("c.pem"), "tls_key": Path("k.pem"), "tls_client_ca": Path("ca.pem")}, id="mtls"),
        pytest.param({"allow_unauthenticated": True}, id="allowed-on-purpose"),
        pytest.param({"host": "127.0.0.1"}, id="loopback"),
    ],
)
def test_a_generator_with_authenticated_callers_or_the_setting_may_start(
    tmp_path: Path, overrides: dict[str, object]
) -> None:
    check_callers_authenticated(settings_for(tmp_path, **{"host": "0.0.0.0", **overrides}))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"auth_token": ""}, id="empty-token"),
        pytest.param({"tls_cert": Path("c.pem"), "tls_key": Path("k.pem")}, id="tls-without-client-certificates"),
        pytest.param({"host": "gen.localhost"}, id="dot-localhost-name"),
    ],
)
def test_a_generator_whose_callers_are_anyone_refuses(tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="not authenticated"):
        check_callers_authenticated(settings_for(tmp_path, **{"host": "0.0.0.0", **overrides}))
