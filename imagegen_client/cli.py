"""`imagegen`: generate images, follow jobs and manage credits from a terminal."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import grpc
import httpx
import typer
from imagegen.job.v1 import job_service_pb2 as pb
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imagegen_client.client import ImageGenClient, inline_image, job_image
from imagegen_client.client import webhook_event as webhook_event_number
from imagegen_common.dev_tokens import DEV_JWT_SECRET, DEV_USER_ID, mint_token

app = typer.Typer(help="Generate images through imagegen's JobService.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and control jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
console = Console(stderr=True)

Target = Annotated[str, typer.Option(envvar="IMAGEGEN_TARGET", help="JobService address.")]
Token = Annotated[
    str, typer.Option(envvar="IMAGEGEN_TOKEN", help="Bearer token; default: a dev token for the dev user.")
]
STATE_NAMES: dict[int, str] = {int(v): k.removeprefix("JOB_STATE_") for k, v in pb.JobState.items()}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def state_name(state: int) -> str:
    """The state's short name; a number for a state newer than this client (proto3 enums are open)."""
    return STATE_NAMES.get(state, str(state))


def parse_duration(text: str) -> float:
    """Seconds in "90s", "10m", "1h30m", "2d" or plain seconds ("45")."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 10m, 1h30m or 2d")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _token(token: str) -> str:
    if token:
        return token
    secret = os.environ.get("SUPABASE_JWT_SECRET") or DEV_JWT_SECRET
    return mint_token(secret)


def _client(target: str, token: str) -> ImageGenClient:
    """TLS from the environment: IMAGEGEN_TLS_CA (a CA file; or IMAGEGEN_TLS=1 for the system's CAs), plus
    IMAGEGEN_TLS_CERT and IMAGEGEN_TLS_KEY for mutual TLS. Plaintext otherwise."""

    def read(name: str) -> bytes | None:
        path = os.environ.get(name)
        return Path(path).read_bytes() if path else None

    return ImageGenClient(
        target,
        _token(token),
        secure=os.environ.get("IMAGEGEN_TLS", "") not in ("", "0", "false"),
        root_certificates=read("IMAGEGEN_TLS_CA"),
        certificate_chain=read("IMAGEGEN_TLS_CERT"),
        private_key=read("IMAGEGEN_TLS_KEY"),
    )


def _run(coroutine: object) -> None:
    try:
        asyncio.run(coroutine)  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as error:
        console.print(f"[red]{error.code().name}[/red]: {error.details()}")
        raise typer.Exit(1) from None


@app.command()
def token(
    user: Annotated[str, typer.Option(help="The user id (sub).")] = DEV_USER_ID,
    service_role: Annotated[bool, typer.Option(help="Mint a service_role token instead.")] = False,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Print a development token signed with SUPABASE_JWT_SECRET (or the local dev secret)."""
    secret = os.environ.get("SUPABASE_JWT_SECRET") or DEV_JWT_SECRET
    print(mint_token(secret, user_id=user, ttl_seconds=ttl, service_role=service_role))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    n: Annotated[int, typer.Option("-n", "--count", help="Number of images, 1-4.")] = 4,
    aspect: Annotated[
        str, typer.Option(help="An aspect ratio the model takes, e.g. 16:9, 21:9 (`imagegen models`).")
    ] = "1:1",
    size: Annotated[str, typer.Option(help="512, 1K, 2K or 4K, where the model offers it (`imagegen models`).")] = "",
    seed: Annotated[
        int | None, typer.Option(help="Random seed (needs --no-watermark), where the model takes one.")
    ] = None,
    watermark: Annotated[
        bool | None, typer.Option("--watermark/--no-watermark", help="The provider's invisible watermark.")
    ] = None,
    jpeg: Annotated[int, typer.Option(help="JPEG output at this quality (1-100); default PNG.")] = 0,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="An input image (PNG, JPEG, WebP) for models that take them; repeat, in order."),
    ] = None,
    model: Annotated[str, typer.Option(help="Model id; default: the service's default.")] = "",
    out: Annotated[Path, typer.Option(help="Folder to download the images into.")] = Path("images"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the job.")] = 300.0,
    request_id: Annotated[
        str,
        typer.Option(
            help="Idempotency key: running the command again with the same key makes no second job. "
            "Default: a new UUID (kept across this command's own retries)."
        ),
    ] = "",
    webhook: Annotated[
        str, typer.Option(help="Also POST the job's events to this https:// URL (signed; see docs/webhooks.md).")
    ] = "",
    webhook_event: Annotated[
        list[str] | None,
        typer.Option(
            help="An event to send to --webhook (repeatable): started, image_stored, completed, failed, cancelled, "
            "expired. Default: the job's end (completed, failed, cancelled, expired)."
        ),
    ] = None,
    priority: Annotated[
        int | None, typer.Option(help="0 (lowest) to 9 (highest); default: your account's (5 unless premium).")
    ] = None,
    start_within: Annotated[
        str,
        typer.Option(
            help="The job must start within this long (e.g. 90s, 10m, 1h) or it ends EXPIRED, its credits released."
        ),
    ] = "",
    target: Target = "localhost:50051",
    token: Token = "",
) -> None:
    """Create a job, show its progress live, download the images and print their paths."""
    try:
        events = [webhook_event_number(name) for name in webhook_event or ()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--webhook-event") from None
    within = parse_duration(start_within) if start_within else None

    extra = pb.GenerationParams(jpeg_quality=jpeg, output_mime_type="image/jpeg" if jpeg else "")
    if seed is not None:
        extra.seed = seed
    if watermark is not None:
        extra.add_watermark = watermark
    inputs = [inline_image(path.read_bytes()) for path in image or []]
    options = _JobOptions(
        model, n, aspect, size, extra, inputs, request_id, out, timeout, webhook, events, priority, within
    )
    _run(_generate_and_download(target, token, prompt, options))


@app.command()
def edit(
    job_id: Annotated[str, typer.Argument(help="The job whose image to edit.")],
    prompt: Annotated[str, typer.Argument(help="What to change.")],
    index: Annotated[int, typer.Option(help="Which of the job's images.")] = 0,
    n: Annotated[int, typer.Option("-n", "--count", help="Number of images, 1-4.")] = 1,
    aspect: Annotated[str, typer.Option(help="Aspect ratio; default the model's.")] = "",
    size: Annotated[str, typer.Option(help="512, 1K, 2K or 4K, where the model offers it.")] = "",
    model: Annotated[str, typer.Option(help="Model id; default the source job's.")] = "",
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="More input images after the edited one; repeat, in order.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder to download the images into.")] = Path("images"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the job.")] = 300.0,
    target: Target = "localhost:50051",
    token: Token = "",
) -> None:
    """Make a new job from image INDEX of job JOB_ID and a prompt (the image is not downloaded or sent again)."""

    async def run() -> None:
        async with _client(target, token) as client:
            source = await client.get_job(job_id)
        inputs = [job_image(job_id, index), *(inline_image(path.read_bytes()) for path in image or [])]
        options = _JobOptions(model or source.model, n, aspect, size, None, inputs, "", out, timeout)
        await _generate_and_download(target, token, prompt, options)

    _run(run())


@dataclass(frozen=True)
class _JobOptions:
    model: str
    count: int
    aspect: str
    size: str
    extra: pb.GenerationParams | None
    inputs: list[pb.InputImage]
    request_id: str
    out: Path
    timeout: float
    webhook_url: str = ""
    webhook_events: tuple[int, ...] | list[int] = ()
    priority: int | None = None
    start_within: float | None = None


async def _generate_and_download(target: str, token: str, prompt: str, options: _JobOptions) -> None:
    """Creates the job, shows its progress live, downloads the images and prints their paths."""
    out, timeout = options.out, options.timeout
    async with _client(target, token) as client:
        job = await client.create_job(
            prompt,
            model=options.model,
            sample_count=options.count,
            aspect_ratio=options.aspect,
            image_size=options.size,
            request_id=options.request_id,
            webhook_url=options.webhook_url,
            webhook_events=options.webhook_events,
            priority=options.priority,
            start_within=options.start_within,
            params=options.extra,
            input_images=options.inputs,
        )
        console.print(f"job [bold]{job.id}[/bold] created")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("pending", total=job.params.sample_count)
            async with asyncio.timeout(timeout):
                async for update in client.watch(job.id):
                    job = update.job
                    progress.update(bar, description=state_name(job.state).lower(), completed=len(job.images))
        if job.state != pb.JOB_STATE_COMPLETED:
            console.print(f"[red]job {state_name(job.state)}[/red]: {job.error.reason} {job.error.message}")
            raise typer.Exit(1)
        out.mkdir(parents=True, exist_ok=True)
        async with httpx.AsyncClient(timeout=60) as http:
            for image in job.images:
                response = await http.get(image.url)
                response.raise_for_status()
                path = out / f"{job.id}-{image.index}.{image.storage_path.rsplit('.', 1)[-1]}"
                path.write_bytes(response.content)
                print(path)
        if job.filtered_count:
            console.print(f"{job.filtered_count} image(s) withheld by safety filters")
        console.print(f"charged {job.credits_charged} credit(s)")


def _job_table(jobs: list[pb.Job]) -> Table:
    table = Table()
    # Full ids, never wrapped or cut: they are what people copy into the next command.
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("state", no_wrap=True, min_width=10)  # CANCELLED, whole, even on an 80-column pipe
    for column in ("priority", "images", "credits", "created", "prompt"):
        table.add_column(column)
    for job in jobs:
        table.add_row(
            job.id,
            state_name(job.state),
            str(job.priority),
            f"{len(job.images)}/{job.params.sample_count}",
            str(job.credits_charged),
            job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            job.prompt if len(job.prompt) <= 40 else job.prompt[:39] + "…",
        )
    return table


@jobs_app.command("get")
def jobs_get(job_id: str, target: Target = "localhost:50051", token: Token = "") -> None:
    """Print one job."""

    async def run() -> None:
        async with _client(target, token) as client:
            job = await client.get_job(job_id)
            Console().print(_job_table([job]))
            if job.HasField("images_delete_time"):
                deleted = job.images_delete_time.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")
                print(f"{len(job.images)} image(s) deleted {deleted} (retention)")
            for image in job.images:
                if image.url:
                    print(image.url)
            if job.error.reason:
                print(f"error: {job.error.reason}: {job.error.message}")

    _run(run())


@jobs_app.command("webhooks")
def jobs_webhooks(job_id: str, target: Target = "localhost:50051", token: Token = "") -> None:
    """List a job's webhook deliveries and each send's HTTP status."""

    async def run() -> None:
        async with _client(target, token) as client:
            # One line per delivery, never cut to the terminal's width: ids are what people copy.
            for delivery in await client.list_webhook_deliveries(job_id):
                sends = " ".join(str(a.http_status or "-") for a in delivery.attempts) or "-"
                line = [
                    delivery.id,
                    pb.WebhookEvent.Name(delivery.event).removeprefix("WEBHOOK_EVENT_").lower(),
                    pb.WebhookDeliveryState.Name(delivery.state).removeprefix("WEBHOOK_DELIVERY_STATE_"),
                    f"sends: {sends}",
                ]
                if delivery.last_error:
                    line.append(f"last error: {delivery.last_error}")
                print("  ".join(line))

    _run(run())


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="How many jobs.")] = 20,
    state: Annotated[str, typer.Option(help="Only jobs in this state, e.g. COMPLETED.")] = "",
    target: Target = "localhost:50051",
    token: Token = "",
) -> None:
    """List your jobs, newest first, as a table."""

    async def run() -> None:
        async with _client(target, token) as client:
            state_value = pb.JobState.Value(f"JOB_STATE_{state.upper()}") if state else 0
            response = await client.list_jobs(page_size=limit, state=state_value)
            Console().print(_job_table(list(response.jobs)))

    _run(run())


@jobs_app.command("watch")
def jobs_watch(job_id: str, target: Target = "localhost:50051", token: Token = "") -> None:
    """Print each change of a job until it ends."""

    async def run() -> None:
        async with _client(target, token) as client:
            async for update in client.watch(job_id):
                what = (
                    pb.JobEventType.Name(update.event.type).removeprefix("JOB_EVENT_TYPE_")
                    if update.HasField("event")
                    else "SNAPSHOT"
                )
                print(f"{what:<20} {state_name(update.job.state):<11} images={len(update.job.images)}")

    _run(run())


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, target: Target = "localhost:50051", token: Token = "") -> None:
    """Cancel a job."""

    async def run() -> None:
        async with _client(target, token) as client:
            job = await client.cancel_job(job_id)
            print(f"{job.id} {state_name(job.state)}{' (cancel requested)' if job.cancel_requested else ''}")

    _run(run())


@jobs_app.command("delete")
def jobs_delete(job_id: str, target: Target = "localhost:50051", token: Token = "") -> None:
    """Delete a job and its images (a running job is cancelled first; delivered images are charged)."""

    async def run() -> None:
        async with _client(target, token) as client:
            await client.delete_job(job_id)
            print(f"{job_id} deleted")

    _run(run())


@app.command()
def credits(target: Target = "localhost:50051", token: Token = "") -> None:
    """Show your credit balance."""

    async def run() -> None:
        async with _client(target, token) as client:
            balance = await client.credit_balance()
            print(f"balance {balance.balance}, reserved {balance.reserved}{', premium' if balance.premium else ''}")

    _run(run())


@app.command()
def models(target: Target = "localhost:50051", token: Token = "") -> None:
    """List the models a job can use: sizes, aspect ratios, input images, parameters and price."""

    async def run() -> None:
        async with _client(target, token) as client:
            table = Table("id", "name", "sizes", "aspect ratios", "inputs", "parameters", "credits/image")
            for model in await client.list_models():
                table.add_row(
                    model.id,
                    model.display_name + (" (thinks)" if model.thinking else ""),
                    ", ".join(model.image_sizes),
                    " ".join(model.aspect_ratios),
                    str(model.max_input_images),
                    ", ".join(model.parameters),
                    str(model.price_per_image),
                )
            Console(width=200).print(table)

    _run(run())


@app.command()
def templates(target: Target = "localhost:50051", token: Token = "") -> None:
    """List the prompt templates."""

    async def run() -> None:
        async with _client(target, token) as client:
            table = Table("id", "name", "variables", "prompt")
            for template in await client.list_templates():
                table.add_row(template.id, template.name, ", ".join(template.variables), template.prompt_template)
            Console().print(table)

    _run(run())


def main() -> None:
    app()
