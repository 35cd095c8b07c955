"""Transport security rules shared by both services: plaintext gRPC only where it is safe or asked for."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc


class PlaintextRefusedError(ValueError):
    """The configuration would serve (or call) plaintext gRPC beyond this machine without saying so."""


def is_loopback_host(host: str) -> bool:
    """Whether `host` can only mean this machine: an IP literal in 127.0.0.0/8 or ::1, or the name `localhost`.

    Strict on purpose, because it decides whether plaintext and the development defaults are safe: other
    names (`*.localhost`, `ip6-localhost`, anything resolved by a DNS server) may resolve elsewhere, and
    0.0.0.0 / :: listen on every interface.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(address: str) -> str:
    """The host part of host:port, [v6]:port or a bare host."""
    if address.startswith("["):
        return address[1 : address.find("]")]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address if ":" not in address else address.rsplit(":", 1)[0]


def target_is_local(target: str) -> bool:
    """Whether every address of a gRPC target is on this machine (unix sockets, loopback addresses)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return all(is_loopback_host(_split_host(a)) for a in target[len(scheme) :].split(",") if a)
    if target.startswith("dns://"):
        authority, _, target = target[len("dns://") :].partition("/")
        if authority:  # dns://8.8.8.8/localhost: that server says where "localhost" is
            return False
    elif target.startswith("dns:"):
        target = target[len("dns:") :]
    if "/" in target:  # another scheme, or not a target at all
        return False
    return is_loopback_host(_split_host(target))


def check_listener(host: str, tls: bool, allow_plaintext: bool | None, setting: str) -> None:
    """Refuses a plaintext listener beyond loopback unless `setting` says true.

    None (the default) means "only on loopback", which is what local development binds to.
    """
    if tls or allow_plaintext or (allow_plaintext is None and is_loopback_host(host)):
        return
    raise PlaintextRefusedError(
        f"refusing to serve plaintext gRPC on {host}: configure TLS (see docs/security.md), bind to 127.0.0.1, "
        f"or set {setting}=true to accept plaintext on purpose (e.g. behind a TLS-terminating proxy)"
    )


def check_client(target: str, tls: bool, allow_plaintext: bool | None, setting: str) -> None:
    """The same rule for an outgoing channel: plaintext to another machine only when asked for."""
    if tls or allow_plaintext or (allow_plaintext is None and target_is_local(target)):
        return
    raise PlaintextRefusedError(
        f"refusing a plaintext channel to {target}: configure TLS for it (see docs/security.md) or set "
        f"{setting}=true to accept plaintext on purpose (e.g. a private network with the shared token)"
    )


def channel_credentials(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files; a client certificate and key make it mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
