"""JobService's SQL by name: job_service/sql/queries.sql, parsed once, on first use (a store's constructor).

A query is a `-- name: <name>` line, its docstring (`-- ` lines, at least one), then its SQL up to the first blank
line. Between queries only comments and blank lines may stand. A malformed file (a name twice, a query without a
docstring or SQL, stray text) fails the first `queries()` call, and so the service's start; a name the file does
not hold fails its lookup. Code looks a query up as `self._sql["name"]`: tests/unit/test_queries.py finds the
names that way to check each one it uses is in the file and each one in the file is used.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources

_HEADER = re.compile(r"-- name: (?P<name>\S*)\s*")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SOURCE = "job_service/sql/queries.sql"


class QueryFileError(ValueError):
    """The query file is malformed; the message names the line."""


class UnknownQuery(LookupError):
    """No query of that name in the file."""


@dataclass(frozen=True)
class Query:
    name: str
    doc: str
    text: str
    line: int  # of its `-- name:` header


class Queries:
    """The queries of one file, by name."""

    def __init__(self, queries: dict[str, Query], source: str) -> None:
        self._queries = queries
        self._source = source

    def __getitem__(self, name: str) -> str:
        """The SQL of the query called `name`."""
        query = self._queries.get(name)
        if query is None:
            raise UnknownQuery(f"no query named {name!r} in {self._source}")
        return query.text

    def all(self) -> list[Query]:
        return list(self._queries.values())


@dataclass
class _Draft:
    name: str
    line: int
    doc: list[str] = field(default_factory=list)
    sql: list[str] = field(default_factory=list)


def parse(text: str, source: str) -> Queries:
    """The queries of a file's `text`; `source` names the file in errors."""
    queries: dict[str, Query] = {}
    draft: _Draft | None = None

    def finish(draft: _Draft) -> None:
        if not draft.doc:
            raise QueryFileError(f"{source}:{draft.line}: query {draft.name!r} has no docstring (`-- ` lines)")
        if not draft.sql:
            raise QueryFileError(f"{source}:{draft.line}: query {draft.name!r} has no SQL")
        queries[draft.name] = Query(draft.name, " ".join(draft.doc), "\n".join(draft.sql), draft.line)

    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.fullmatch(line)
        if header is not None:
            if draft is not None:
                finish(draft)
            name = header["name"]
            if not _NAME.fullmatch(name):
                raise QueryFileError(f"{source}:{number}: {name!r} is not a query name (a-z, 0-9, _)")
            if name in queries:
                first = queries[name].line
                raise QueryFileError(f"{source}:{number}: query {name!r} is defined twice (first on line {first})")
            draft = _Draft(name, number)
        elif draft is not None and draft.sql:  # inside a query's SQL, which a blank line ends
            if line.strip():
                draft.sql.append(line.rstrip())
            else:
                finish(draft)
                draft = None
        elif line.startswith("--"):
            if draft is not None:
                draft.doc.append(line[2:].strip())
        elif line.strip():
            if draft is None:
                raise QueryFileError(f"{source}:{number}: SQL outside a query (no `-- name:` line before it)")
            draft.sql.append(line.rstrip())
    if draft is not None:
        finish(draft)
    return Queries(queries, source)


@functools.cache
def queries() -> Queries:
    """The packaged query file, parsed on the first call and shared after."""
    text = resources.files("job_service").joinpath("sql", "queries.sql").read_text(encoding="utf-8")
    return parse(text, _SOURCE)
