"""Sends queued webhook deliveries: any replica, bounded concurrency, its own task (jobs never wait for it).

Each replica claims due deliveries with a lease (FOR UPDATE SKIP LOCKED, so replicas share the queue), sends
each once per claim, and records the result; a replica that dies mid-send leaves its lease to run out, and
another sends again (at least once: receivers deduplicate on `webhook-id`). A job's deliveries go out one at a
time in event order (the claim takes only the earliest pending one of each job).

Every send resolves the URL's host once, refuses it if any address it resolves to is forbidden (SSRF, see
webhooks.address_refusal), and connects to the address it checked: the request goes to that IP, with the
name in the Host header and as the TLS server name (so the certificate is checked against the name). No
redirects are followed, no proxy from the environment is used, and no connection is reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from job_service.domain import Job
from job_service.periodic import PeriodicTask
from job_service.store import CONNECTION_ERRORS
from job_service.webhook_store import Delivery, Outcome, WebhookStore
from job_service.webhooks import (
    Address,
    RetrySchedule,
    Signer,
    WebhookPolicy,
    address_refusal,
    literal_address,
    message_id,
)

log = structlog.get_logger(__name__)

JobRenderer = Callable[[Job], dict[str, Any]]
# host, port -> the addresses it resolves to (as text); the default asks the system resolver.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host}: {exc.strerror}") from None
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class SenderConfig:
    owner: str
    concurrency: int
    timeout_seconds: float
    poll_interval: float
    schedule: RetrySchedule
    policy: WebhookPolicy
    user_agent: str = "imagegen-webhooks/1"

    @property
    def lease_seconds(self) -> float:
        # Longer than any send can take (the whole request is bounded by timeout_seconds), so a live replica
        # never loses a lease it is using, yet a dead one's sends are retried soon after.
        return self.timeout_seconds * 2 + 5.0


class WebhookMetricsSink:
    """What the sender reports; JobService wires Prometheus metrics in (webhook metrics in metrics.py)."""

    def attempt(self, outcome: str, seconds: float) -> None: ...

    def ended(self, state: str, seconds_since_event: float) -> None: ...


class SendRefused(Exception):
    """The URL may not be sent to (its host resolves to a forbidden address): given up at once."""


def body_of(delivery: Delivery, render: JobRenderer) -> bytes:
    """The delivery's body: the same bytes at every attempt (compact JSON of type, event time and the job)."""
    payload = {
        "type": delivery.type,
        "timestamp": delivery.event_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": render(delivery.job),
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: the backoff applies


class WebhookSender:
    def __init__(
        self,
        store: WebhookStore,
        signer: Signer,
        render: JobRenderer,
        config: SenderConfig,
        metrics: WebhookMetricsSink | None = None,
        http: httpx.AsyncClient | None = None,
        resolve: Resolver = system_resolve,
    ) -> None:
        self._resolve = resolve
        self._store = store
        self._signer = signer
        self._render = render
        self._config = config
        self._metrics = metrics or WebhookMetricsSink()
        self._http = http or httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would resolve (and reach) names itself
            timeout=httpx.Timeout(config.timeout_seconds),
            # A connection made to one checked name is never reused for another name on the same address.
            limits=httpx.Limits(max_keepalive_connections=0, max_connections=max(1, config.concurrency)),
        )
        self._sending: dict[str, asyncio.Task[None]] = {}
        # The claim's wait doubles after each failure in a row (up to 5 s), from the poll interval.
        self._loop = PeriodicTask(
            "webhook-sender",
            "webhook claim",
            self._claim_round,
            after_failure=lambda failures: min(config.poll_interval * 2**failures, 5.0),
        )

    @property
    def in_flight(self) -> int:
        return len(self._sending)

    def start(self) -> None:
        self._loop.start()

    def wake(self) -> None:
        """New work may be due (an event was written or notified)."""
        self._loop.wake()

    async def stop(self) -> None:
        """Stops claiming, abandons the sends under way (their deliveries are handed back, due at once on any
        replica) and closes the HTTP client."""
        await self._loop.stop(patience_seconds=0)
        abandoned = list(self._sending)
        for task in list(self._sending.values()):
            task.cancel()
        await asyncio.gather(*self._sending.values(), return_exceptions=True)
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._store.release(self._config.owner, abandoned)
        await self._http.aclose()

    async def _claim_round(self) -> float:
        """Claims what is due, as many as there are free slots, and sends each in a task of its own; the seconds
        until the next claim (0 when every free slot was filled: more may be due right now)."""
        free = self._config.concurrency - len(self._sending)
        claimed = await self._store.claim(self._config.owner, free, self._config.lease_seconds) if free > 0 else []
        for delivery in claimed:
            task = asyncio.create_task(self._send(delivery), name=f"webhook-{delivery.id}")
            self._sending[delivery.id] = task
        if claimed and len(claimed) == free:
            return 0.0
        wait = self._config.poll_interval
        if not claimed and free > 0:
            with contextlib.suppress(Exception):
                due_in = await self._store.next_due_in()
                if due_in is not None:
                    wait = min(wait, max(0.01, due_in))
        return wait

    async def _send(self, delivery: Delivery) -> None:
        try:
            outcome = await self.send_once(delivery)
            for pause in (0.2, 0.5, 1.0, 2.0, 5.0):
                try:
                    state = await self._store.record(delivery, self._config.owner, outcome)
                    break
                except CONNECTION_ERRORS:
                    await asyncio.sleep(pause)  # the lease outlives these; if not, another replica resends
            else:
                return
            if state in ("delivered", "failed"):
                self._metrics.ended(state, (datetime.now(UTC) - delivery.event_at).total_seconds())
                log_line = log.info if state == "delivered" else log.warning
                log_line(
                    "webhook " + state,
                    job_id=delivery.job_id,
                    webhook_id=message_id(delivery.id),
                    type=delivery.type,
                    attempts=delivery.attempts,
                    http_status=outcome.http_status,
                    error=outcome.error or None,
                )
        except Exception:
            log.exception("webhook send failed", job_id=delivery.job_id, webhook_id=message_id(delivery.id))
        finally:
            self._sending.pop(delivery.id, None)
            self.wake()  # the job's next delivery may now be due, and a slot is free

    async def send_once(self, delivery: Delivery) -> Outcome:
        """One send of `delivery` (nothing recorded): what it came to, and when to try again."""
        started = time.monotonic()
        status: int | None = None
        retry_after: float | None = None
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                status, retry_after = await self._post(delivery)
            error = "" if 200 <= status < 300 else f"HTTP {status}"
            kind = "delivered" if not error else "http_error"
        except SendRefused as exc:
            error, kind = str(exc), "refused"
        except TimeoutError:
            error, kind = f"no answer within {self._config.timeout_seconds:g}s", "timeout"
        except httpx.HTTPError as exc:
            error, kind = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, "network_error"
        except OSError as exc:
            error, kind = f"{type(exc).__name__}: {exc}", "network_error"
        except Exception as exc:
            # A fault of ours (a snapshot that does not render, ...): recorded and retried like any failed send,
            # never a delivery leased again and again without a trace.
            log.exception("webhook send failed", job_id=delivery.job_id, webhook_id=message_id(delivery.id))
            error, kind = f"internal error: {type(exc).__name__}", "internal_error"
        seconds = time.monotonic() - started
        self._metrics.attempt(kind, seconds)
        delivered = kind == "delivered"
        retry_in: float | None = None
        if not delivered and kind != "refused" and status != 410:  # 410 Gone: the receiver wants no more
            retry_in = self._config.schedule.delay(delivery.attempts, retry_after)
            age = (datetime.now(UTC) - delivery.event_at).total_seconds()
            if age + retry_in > self._config.schedule.give_up_after_seconds:
                retry_in = None
        return Outcome(status, error, seconds, delivered, retry_in)

    async def _post(self, delivery: Delivery) -> tuple[int, float | None]:
        url = httpx.URL(delivery.url)
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        address = await self._checked_address(host, port)
        body = body_of(delivery, self._render)
        timestamp = int(time.time())
        webhook_id = message_id(delivery.id)
        headers = {
            "host": url.netloc.decode("ascii"),
            "content-type": "application/json",
            "user-agent": self._config.user_agent,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self._signer.signature_header(webhook_id, timestamp, body),
        }
        request = self._http.build_request(
            "POST",
            url.copy_with(host=str(address)),
            content=body,
            headers=headers,
            # TLS: the certificate must be the name's, not the address's.
            extensions={"sni_hostname": host} if url.scheme == "https" else {},
        )
        response = await self._http.send(request, stream=True)
        try:
            return response.status_code, _retry_after(response)
        finally:
            await response.aclose()  # the body is not wanted: never read a receiver's answer

    async def _checked_address(self, host: str, port: int) -> Address:
        """The one address to connect to: every address the name resolves to must be allowed."""
        literal = literal_address(host)
        if literal is not None:
            addresses: list[Address] = [literal]
        else:
            addresses = []
            for resolved in await self._resolve(host, port):
                parsed = literal_address(resolved.split("%", 1)[0])  # no IPv6 zone
                if parsed is not None and parsed not in addresses:
                    addresses.append(parsed)
            if not addresses:
                raise OSError(f"{host} resolves to no address")
        for address in addresses:
            if problem := address_refusal(address, self._config.policy):
                raise SendRefused(f"refused: {host} resolves to {problem}")
        return addresses[0]
