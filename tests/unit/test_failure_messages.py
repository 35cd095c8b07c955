"""Every reason a job can fail with has a plain sentence of its own, so none falls back to the generic one."""

from __future__ import annotations

import re
from pathlib import Path

from job_service.failure_messages import GENERIC_MESSAGE, USER_MESSAGES, logged_detail, user_message

DOCS = Path(__file__).resolve().parents[2] / "docs"


def generator_reasons() -> set[str]:
    """The reasons of docs/generator.md's errors table."""
    text = (DOCS / "generator.md").read_text()
    return set(re.findall(r"^\| `([A-Z_]+)` +\| [A-Z_]+ +\| (?:yes|no) ", text, re.MULTILINE))


def test_every_generator_reason_has_its_own_sentence() -> None:
    reasons = generator_reasons()
    assert {"PROMPT_BLOCKED", "PROVIDER_IMAGE_TOO_LARGE", "STORAGE_UNAVAILABLE"} <= reasons  # the table was read
    # DRAINING never reaches a job: JobService turns it into GENERATOR_UNAVAILABLE.
    assert sorted(reasons - {"DRAINING"} - set(USER_MESSAGES)) == []


def test_an_unknown_reason_gets_the_generic_sentence_and_never_the_generators_text() -> None:
    assert user_message("A_NEWER_GENERATORS_REASON") == GENERIC_MESSAGE
    assert all(sentence.endswith(".") and sentence[0].isupper() for sentence in USER_MESSAGES.values())


def test_the_logged_detail_is_escaped_and_bounded() -> None:
    assert logged_detail("line one\nfake line\x1b[31m") == "line one\\nfake line\\x1b[31m"
    long = logged_detail("x" * 10_000)
    assert long.startswith("x" * 2000) and long.endswith("... (10000 chars)") and len(long) < 2100
