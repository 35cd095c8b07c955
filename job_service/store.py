"""PostgreSQL access for jobs, events, templates and credits (asyncpg; no gRPC).

Every state change is one call of a SQL function from the migrations (one round trip, one
transaction); this module turns rows into domain objects and SQLSTATEs into ServiceErrors. Every query it
runs is a named query of job_service/sql/queries.sql.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import NamedTuple, Protocol

import asyncpg
import structlog

from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument
from job_service.domain import (
    CreditBalance,
    Job,
    JobEvent,
    JobEventType,
    JobState,
    Params,
    StoredImage,
    Template,
)
from job_service.group_commit import GroupCommit
from job_service.queries import queries
from job_service.state_changes import StateChange

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "imagegen_jobs"

# Database trouble that a retry later can get past: no connection, a connection that broke, a server
# shutting down or starting up (57P01-57P03).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)

_CREATE_ERRORS = {
    "IG001": (ErrorKind.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS"),
    "IG002": (ErrorKind.RESOURCE_EXHAUSTED, "TOO_MANY_ACTIVE_JOBS"),
    "IG003": (ErrorKind.ALREADY_EXISTS, "REQUEST_ID_REUSED"),
    "IG005": (ErrorKind.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    "IG006": (ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
}


def _detail(detail: str | None) -> dict[str, float]:
    """The numbers of the JSON object a refusal carries in its DETAIL (rate limit, priority), or {}."""
    try:
        value = json.loads(detail or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {key: float(number) for key, number in value.items() if type(number) in (int, float)}


def _create_refusal(sqlstate: str | None, message: str, detail: str | None = None) -> ServiceError | None:
    """The caller's error for a create the rules refused (credits, active jobs, request_id reuse, rate limit,
    priority above the account's maximum), else None."""
    mapped = _CREATE_ERRORS.get(sqlstate or "")
    if mapped is None:
        return None
    if sqlstate == "IG005":
        facts = _detail(detail)
        limit, window = int(facts.get("limit", 0)), float(facts.get("window_seconds", 60))
        retry_after = float(facts.get("retry_after", window))
        return ServiceError(
            mapped[0],
            mapped[1],
            f"too many jobs: at most {limit} per {window:g} seconds; retry in {retry_after:.1f} s",
            metadata={"limit": str(limit), "window_seconds": f"{window:g}"},
            retry_after=retry_after,
        )
    if sqlstate == "IG006":
        highest = int(_detail(detail).get("max", 0))
        return invalid_argument([FieldViolation("priority", f"must be 0-{highest} for this account")])
    return ServiceError(mapped[0], mapped[1], message)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to send.

    asyncpg's default sends "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;" on
    every release, a second round trip (and server work) for every query. Pool connections never lock,
    open cursors, LISTEN or SET (migrations and LISTEN have connections of their own), and the pool still
    rolls back a transaction left open before it calls this.
    """


async def create_pool(dsn: str, *, min_size: int, max_size: int, statement_cache_size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        statement_cache_size=statement_cache_size,
        init=_init_connection,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


# What a job held reserved before the write that returns it. A statement reads the database as it was when the
# statement began, whatever the function it calls changes meanwhile, so this is the reservation the write released
# if it settled the job (imagegen_advance zeroes credits_reserved then): the metrics layer gets it from the write's
# own answer instead of reading the ledger once more per settled job.


def job_from_row(row: asyncpg.Record) -> Job:
    params = row["params"] or {}
    return Job(
        id=str(row["id"]),
        user_id=str(row["user_id"]),
        status=JobState(row["status"]),
        prompt=row["prompt"],
        model=row["model"],
        params=Params.from_dict(params),
        template_id=row["template_id"],
        request_id=row["request_id"],
        images=[StoredImage(**image) for image in row["images"] or []],
        filtered_count=row["filtered_count"],
        filtered_reasons=list(row["filtered_reasons"] or []),
        error_code=row["error_code"],
        error_message=row["error_message"],
        attempt=row["attempt"],
        failed_attempts=row["failed_attempts"],
        max_attempts=row["max_attempts"],
        credits_reserved=row["credits_reserved"],
        credits_charged=row["credits_charged"],
        cancel_requested=row["cancel_requested"],
        lease_owner=row["lease_owner"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        next_attempt_at=row["next_attempt_at"],
        last_event_seq=row["last_event_seq"],
        # .get: rows built by hand (tests, older functions' column lists) may not carry them.
        images_deleted_at=row.get("images_deleted_at"),
        deleted_at=row.get("deleted_at"),
        webhook_url=row.get("webhook_url"),
        webhook_events=list(row.get("webhook_events") or []),
        priority=row["priority"],
        start_deadline=row["start_deadline"],
    )


def _template_from_row(row: asyncpg.Record) -> Template:
    from job_service.templates import placeholders, usable_defaults  # the template rules live together

    return Template(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        prompt_template=row["prompt_template"],
        variables=placeholders(row["prompt_template"]),
        model=row["model"],
        default_params=usable_defaults(row["id"], row["default_params"] or {}),
        price_per_image=row["price_per_image"],
        is_active=row["is_active"],
    )


def _batch_item(change: StateChange) -> dict[str, object]:
    """One element of imagegen_advance_batch's p_events: imagegen_advance's parameters without the p_, nulls left
    out (the function reads a missing key as NULL)."""
    item: dict[str, object] = {"event": change.event.value}
    if change.to is not None:
        item["to"] = change.to.value
    if change.message is not None:
        item["message"] = change.message
    if change.error_code is not None:
        item["error_code"] = change.error_code
    if change.image is not None:
        item["image"] = vars(change.image)
    if change.filtered_count is not None:
        item["filtered"] = change.filtered_count
    if change.filtered_reasons is not None:
        item["filtered_reasons"] = list(change.filtered_reasons)
    if change.retry_delay is not None:
        item["retry_delay"] = change.retry_delay
    if change.cancel_requested is not None:
        item["cancel_requested"] = change.cancel_requested
    if change.count_failure:
        item["count_failure"] = True
    return item


class CommittedEvents(Protocol):
    """Who hears of the events this store commits: job_service.fanout.EventFanout in the service.

    The store is given it, rather than handing each write's events back for its callers to pass on: every
    write of a job event goes through this store (the dispatcher's, CancelJob's, CreateJob's), so no caller can
    forget to deliver them, and the write is known to be under way from before it is sent (`writing`), which the
    watchers' feeds need (see job_service.fanout).
    """

    def writing(self, job_id: str) -> AbstractContextManager[None]: ...

    def committed(self, job: Job, event: JobEvent) -> None: ...


class _Unheard:
    """No one hears of the commits: a store used on its own (scripts, tests)."""

    def writing(self, _job_id: str) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def committed(self, job: Job, event: JobEvent) -> None:
        pass


class _NewJob(NamedTuple):
    """One CreateJob's write: imagegen_create_job_v5's parameters, in its order, under their SQL names."""

    user: str
    prompt: str
    model: str
    params: dict[str, object]
    template_id: str | None
    request_id: str | None
    request_hash: str
    price: int
    sample_count: int
    max_attempts: int
    active_limit: int
    new_user_credits: int
    claim_owner: str | None
    lease_seconds: float | None
    priority: int | None
    priority_rules: list[int] | None
    start_within: float | None
    aging_seconds: float | None
    rate_limits: list[int] | None
    rate_window_seconds: float | None


@dataclass(frozen=True)
class CreateRules:
    """The rules of the account a job is created for, applied by imagegen_create_job_v5 under the account's lock
    (only the account knows whether the user is premium). None: no rule of that kind."""

    # (default, max, premium default, premium max); None: any priority 0-9, default 5.
    priority_rules: tuple[int, int, int, int] | None = None
    # Seconds of waiting per step of priority gained (see the migration 20261206000210).
    aging_seconds: float | None = None
    # (jobs per window, premium jobs per window), 0 = unlimited; None: no limit.
    rate_limits: tuple[int, int] | None = None
    rate_window_seconds: float | None = None


@dataclass(frozen=True)
class ClaimAtCreate:
    """Claim the job for `owner`, with a lease of `lease_seconds`, in the transaction that creates it."""

    owner: str
    lease_seconds: float


@dataclass(frozen=True, kw_only=True)
class CreatedJob:
    """What one create did, as imagegen_create_job_v5 answered it."""

    # The job as its 'created' event left it (pending, attempt 0): what CreateJob answers. For an idempotent replay,
    # the earlier job as it is now.
    job: Job
    # False: an idempotent replay of request_id; nothing was written.
    created: bool
    # The job as this call claimed it for ClaimAtCreate.owner (generating, attempt 1, leased), or None: no claim was
    # asked for, a due job ahead of it in the queue kept it pending, or it is a replay.
    claimed: Job | None
    # The events this call committed, in order: 'created', then 'attempt_started' when it claimed; none for a replay.
    events: tuple[JobEvent, ...]


def _events_of_row(job_id: str, row: asyncpg.Record) -> list[JobEvent]:
    """The events a row carries as arrays (seqs, types, statuses, attempts, ats, messages), in seq order."""
    return [
        JobEvent(
            job_id=job_id,
            seq=seq,
            type=JobEventType(kind),
            status=JobState(status),
            attempt=attempt,
            at=at,
            message=message,
        )
        for seq, kind, status, attempt, at, message in zip(
            row["seqs"] or (),
            row["types"] or (),
            row["statuses"] or (),
            row["attempts"] or (),
            row["ats"] or (),
            row["messages"] or (),
            strict=True,
        )
    ]


def _created_from_row(row: asyncpg.Record) -> CreatedJob:
    job = job_from_row(row)
    claimed = None
    if row["claimed_status"] is not None:
        claimed = replace(
            job,
            status=JobState(row["claimed_status"]),
            attempt=row["claimed_attempt"],
            lease_owner=row["claimed_by"],
            started_at=row["claimed_started_at"],
            last_event_seq=row["claimed_seq"],
        )
    return CreatedJob(job=job, created=row["created"], claimed=claimed, events=tuple(_events_of_row(job.id, row)))


def _event_of(job: Job, event: JobEventType, message: str | None) -> JobEvent:
    """The event a write just committed, from the row it returned: the job's latest event, exactly as a read of
    job_events would give it (its `at` is the transaction's now(), which is also the row's updated_at)."""
    return JobEvent(job.id, job.last_event_seq, event, job.status, job.attempt, job.updated_at, message or "")


# Group commit of creates: up to CREATE_CALLS calls at once, the creates that arrive meanwhile share the
# next one, up to CREATE_BATCH in it. Each batched create is a subtransaction; PostgreSQL keeps 64 of them
# per transaction in shared memory before it spills, so a batch stays below that.
CREATE_BATCH = 32
CREATE_CALLS = 4


class JobStore:
    def __init__(self, pool: asyncpg.Pool, events: CommittedEvents | None = None) -> None:
        self._pool = pool
        self._sql = queries()
        self._creates: GroupCommit[_NewJob, CreatedJob] = GroupCommit(
            self._create_one, self._create_many, max_batch=CREATE_BATCH, max_calls=CREATE_CALLS
        )
        self._events: CommittedEvents = events if events is not None else _Unheard()

    def _committed(self, job: Job, event: JobEvent) -> None:
        """Each job event this store commits (create, advance, advance_batch, claim, expire_due), once, right after
        its write answered, with the job as the write left it.

        The event is built from what the write returned, exactly as a read of job_events would give it, so
        this process's watchers can have it without reading it back. It is the job's latest event, except the
        'created' of a job claimed as it was created: 'attempt_started' follows it in the same transaction.
        """
        self._events.committed(job, event)

    def _committed_change(self, job: Job, row: asyncpg.Record, event: JobEventType, message: str | None) -> None:
        """Reports one committed advance of `job` (as `row`, with its reserved_before, returned it), and its
        settlement when it ended the job."""
        self._committed(job, _event_of(job, event, message))
        if job.status.terminal:
            self._settled(job, row["reserved_before"])

    def _created(self, job: Job) -> None:
        """A create just made `job` and reserved `job.credits_reserved` for it (a replay made nothing). A hook for the
        metrics layer, as _settled is."""

    def _settled(self, job: Job, released: int) -> None:
        """A write just ended `job` and settled its reservation: released `released` credits (all it held) and
        captured `job.credits_charged`. A hook for the metrics layer; the ledger has the same two rows."""

    async def create_job(
        self,
        *,
        user_id: str,
        prompt: str,
        model: str,
        params: Params,
        template_id: str | None,
        request_id: str | None,
        request_hash: str,
        price_per_image: int,
        max_attempts: int,
        active_limit: int,
        new_user_credits: int,
        claim: ClaimAtCreate | None = None,
        webhook: dict[str, object] | None = None,
        priority: int | None = None,
        start_within: float | None = None,
        rules: CreateRules = CreateRules(),
    ) -> CreatedJob:
        """Creates a job (imagegen_create_job_v5), or answers the earlier one for a replay of request_id.

        `webhook` ({"url", "events"}) travels in the params, under "webhook": the create functions insert params
        as they are, and a trigger (migration 20261206000200) moves it into the job's webhook columns in that
        same INSERT, so the webhook is as atomic as the job without another parameter on every create function.

        With `claim`, a job this call makes is also claimed, in the same transaction, unless a due job ahead of it
        in the queue waits (it must not jump the queue); CreatedJob.claimed says whether it was. A replay claims
        nothing.
        """
        made = await self._creates.submit(
            _NewJob(
                user=user_id,
                prompt=prompt,
                model=model,
                params=params.as_dict() | ({"webhook": webhook} if webhook else {}),
                template_id=template_id,
                request_id=request_id,
                request_hash=request_hash,
                price=price_per_image,
                sample_count=params.sample_count,
                max_attempts=max_attempts,
                active_limit=active_limit,
                new_user_credits=new_user_credits,
                claim_owner=claim.owner if claim else None,
                lease_seconds=claim.lease_seconds if claim else None,
                priority=priority,
                priority_rules=list(rules.priority_rules) if rules.priority_rules is not None else None,
                start_within=start_within,
                aging_seconds=rules.aging_seconds,
                rate_limits=list(rules.rate_limits) if rules.rate_limits is not None else None,
                rate_window_seconds=rules.rate_window_seconds,
            )
        )
        if made.created:
            self._created(made.job)
        for event in made.events:  # each with the job as this write left it, as every write reports its events
            self._committed(made.claimed or made.job, event)
        return made

    async def _create_one(self, new: _NewJob) -> CreatedJob:
        try:
            row = await self._pool.fetchrow(
                self._sql["create_job"],
                *new,
            )
        except asyncpg.PostgresError as exc:
            refusal = _create_refusal(exc.sqlstate, exc.args[0] if exc.args else str(exc), getattr(exc, "detail", None))
            if refusal is None:
                raise
            raise refusal from exc
        assert row is not None
        return _created_from_row(row)

    async def _create_many(self, batch: list[_NewJob]) -> list[CreatedJob | BaseException]:
        # Sorted by user (stable: one user's creates keep their order), so that every batch takes the account
        # locks in the same order and two batches in flight at once never deadlock.
        order = sorted(range(len(batch)), key=lambda i: batch[i].user)
        try:
            rows = await self._pool.fetch(
                self._sql["create_jobs"],
                [batch[i]._asdict() for i in order],
            )
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise  # it may have committed: every caller gets the error, as a lone create's caller would
            # The server refused the call, so none of it committed. One create's own fault (anything but the
            # create rules, which the function answers per item) must not fail the others: each goes again alone.
            log.warning("batched create failed; creating one by one", jobs=len(batch), error=repr(exc))
            return list(await asyncio.gather(*(self._create_one(new) for new in batch), return_exceptions=True))
        left_out = RuntimeError("imagegen_create_jobs_v3 left this job out")
        outcomes: list[CreatedJob | BaseException] = [left_out] * len(batch)
        for row in rows:
            position = order[row["idx"] - 1]
            if row["error_code"] is None:
                outcomes[position] = _created_from_row(row)
            else:
                outcomes[position] = _create_refusal(
                    row["error_code"], row["error_message"], row["error_detail"]
                ) or RuntimeError(f"create failed: {row['error_code']} {row['error_message']}")
        return outcomes

    async def put_input_blobs(self, user_id: str, blobs: list[tuple[str, str, bytes]]) -> None:
        """Stores input images (sha256, media type, bytes) of a user for a create in progress; one already stored
        keeps its bytes. Each gets one more hold (release_input_blobs takes it back when the create ends).

        Storing one again moves its created_at to now: the orphan sweep (job_service.retention) deletes only an
        image no job names and that no CreateJob stored within the grace, and this create's job is not inserted yet.
        """
        await self._pool.executemany(
            self._sql["put_input_blobs"],
            [(user_id, digest, mime, data) for digest, mime, data in blobs],
        )

    async def release_input_blobs(self, user_id: str, digests: list[str]) -> int:
        """Takes back one hold on each of a user's input images (a create that stored them has ended) and deletes
        those no job names and no other create holds; returns how many it deleted.

        The rows are locked first, then read by statements of their own: each takes its snapshot after the locks,
        so it sees every create that released (or stored) the same image before, and that create's job, which
        commits before its release. A create storing an image later brings its bytes again (put_input_blobs).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                self._sql["lock_input_blobs"],
                user_id,
                digests,
            )
            await conn.execute(
                self._sql["release_input_blob_holds"],
                user_id,
                digests,
            )
            deleted: int = await conn.fetchval(
                self._sql["delete_unheld_input_blobs"],
                user_id,
                digests,
            )
        return deleted

    async def input_blobs(self, user_id: str, digests: list[str]) -> dict[str, bytes]:
        """The stored bytes of a user's input images, by sha256 (those that exist)."""
        rows = await self._pool.fetch(self._sql["input_blobs"], user_id, digests)
        return {row["sha256"]: bytes(row["data"]) for row in rows}

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._pool.fetchrow(self._sql["get_job"], job_id)
        return job_from_row(row) if row else None

    async def list_jobs(
        self,
        user_id: str,
        *,
        status: JobState | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Job]:
        """A user's jobs newest first, keyset-paginated on (created_at, id)."""
        rows = await self._pool.fetch(
            self._sql["list_jobs"],
            user_id,
            status.value if status else None,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [job_from_row(r) for r in rows]

    async def job_and_events_after(self, job_id: str, seq: int) -> tuple[Job | None, list[JobEvent]]:
        # One statement, one snapshot: the job is never older than the newest event returned (see the query).
        row = await self._pool.fetchrow(self._sql["job_and_events_after"], job_id, seq)
        if row is None:
            return None, []
        job = job_from_row(row)
        return job, _events_of_row(job.id, row)

    async def advance(
        self,
        job_id: str,
        change: StateChange,
        *,
        attempt: int | None,
        from_states: Sequence[JobState],
        only_if_lease_expired: bool = False,
    ) -> Job | None:
        """Applies one change, fenced: only while the job is in one of `from_states` and at `attempt` (None: any),
        and with `only_if_lease_expired` only once its lease has run out. None when the fence refused it (the
        caller no longer holds the job)."""
        with self._events.writing(job_id):
            row = await self._pool.fetchrow(
                self._sql["advance"],
                job_id,
                attempt,
                [state.value for state in from_states],
                change.event.value,
                change.to.value if change.to is not None else None,
                change.message,
                change.error_code,
                vars(change.image) if change.image is not None else None,
                change.filtered_count,
                list(change.filtered_reasons) if change.filtered_reasons is not None else None,
                change.retry_delay,
                change.cancel_requested,
                change.count_failure,
                only_if_lease_expired,
            )
            # A composite NULL comes back as a row of NULLs.
            if row is None or row["id"] is None:
                return None
            job = job_from_row(row)
            self._committed_change(job, row, change.event, change.message)
            return job

    async def advance_batch(
        self, job_id: str, changes: Sequence[StateChange], *, attempt: int, from_states: Sequence[JobState]
    ) -> list[Job]:
        """Applies `changes` in order in one transaction, each as `advance` would with the same fence.

        Returns the job after each change applied; fewer jobs than changes means the fence refused the next one
        (the caller no longer holds the job) and nothing after it was written.
        """
        with self._events.writing(job_id):
            rows = await self._pool.fetch(
                self._sql["advance_batch"],
                job_id,
                attempt,
                [state.value for state in from_states],
                [_batch_item(change) for change in changes],
            )
            jobs = [job_from_row(row) for row in rows]
            for job, change, row in zip(jobs, changes, rows, strict=False):
                self._committed_change(job, row, change.event, change.message)
            return jobs

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        rows = await self._pool.fetch(self._sql["claim_jobs"], owner, limit, lease_seconds)
        jobs = [job_from_row(r) for r in rows]
        for job in jobs:
            self._committed(job, _event_of(job, JobEventType.ATTEMPT_STARTED, None))
        return jobs

    async def expire_due(self, limit: int) -> list[Job]:
        """Ends up to `limit` jobs that never started and are past their start deadline (EXPIRED, reservation
        released); safe on every replica at once (SKIP LOCKED)."""
        rows = await self._pool.fetch(self._sql["expire_jobs"], limit)
        jobs = [job_from_row(row) for row in rows]
        for job, row in zip(jobs, rows, strict=True):
            self._committed_change(job, row, JobEventType.EXPIRED, job.error_message)
        return jobs

    async def renew_leases(self, owner: str, held: Sequence[tuple[str, int]], lease_seconds: float) -> dict[str, bool]:
        """Extends the leases this owner still holds: {job id: cancel_requested} for each one still held.

        Reporting cancel_requested here too means a cancel is acted on even if its NOTIFY was missed.
        """
        if not held:
            return {}
        rows = await self._pool.fetch(
            self._sql["renew_leases"],
            owner,
            [job_id for job_id, _ in held],
            [attempt for _, attempt in held],
            lease_seconds,
        )
        return {str(r["id"]): r["cancel_requested"] for r in rows}

    async def expired_leases(self, limit: int) -> list[Job]:
        rows = await self._pool.fetch(self._sql["expired_leases"], limit)
        return [job_from_row(r) for r in rows]

    async def list_templates(self, *, active_only: bool = True) -> list[Template]:
        rows = await self._pool.fetch(self._sql["list_templates"], active_only)
        return [_template_from_row(r) for r in rows]

    async def get_template(self, template_id: str) -> Template | None:
        row = await self._pool.fetchrow(self._sql["get_template"], template_id)
        return _template_from_row(row) if row else None

    async def credit_balance(self, user_id: str, new_user_credits: int) -> CreditBalance:
        async with self._pool.acquire() as conn:
            await conn.execute(self._sql["ensure_account"], user_id, new_user_credits)
            row = await conn.fetchrow(self._sql["credit_balance"], user_id)
        assert row is not None
        return CreditBalance(user_id, row["balance"], int(row["reserved"]), row["is_premium"])

    async def grant_credits(
        self,
        user_id: str,
        amount: int,
        reason: str,
        *,
        premium: bool | None,
        new_user_credits: int,
        request_id: str | None = None,
    ) -> tuple[int, bool, bool]:
        """(balance, premium, granted): the account after the grant; granted False for a replay of request_id,
        which answers the account as the first grant with that key left it."""
        try:
            row = await self._pool.fetchrow(
                self._sql["grant_credits"],
                user_id,
                amount,
                reason,
                premium,
                new_user_credits,
                request_id,
            )
        except asyncpg.PostgresError as exc:
            refusal = _create_refusal(getattr(exc, "sqlstate", None), str(exc))
            if refusal is None:
                raise
            raise refusal from None
        assert row is not None
        return row["balance"], row["is_premium"], row["granted"]
