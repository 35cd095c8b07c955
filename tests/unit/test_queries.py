"""The named queries: job_service/sql/queries.sql holds exactly the queries the code looks up, and a malformed
file or an unknown name fails loudly instead of sending the wrong SQL."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from job_service.queries import QueryFileError, UnknownQuery, parse, queries
from job_service.retention import INPUT_BLOB_GRACE_SECONDS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("job_service", "generator_service", "imagegen_common")


def _names_the_code_looks_up() -> dict[str, list[str]]:
    """Each name looked up as `<...>._sql["name"]`, with where; a lookup by anything but a literal fails."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)):
                    continue
                if node.value.attr != "_sql":
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                key = node.slice
                assert isinstance(key, ast.Constant) and isinstance(key.value, str), f"{where}: not a literal name"
                found.setdefault(key.value, []).append(where)
    return found


def test_the_file_holds_exactly_the_queries_the_code_looks_up() -> None:
    in_file = {query.name for query in queries().all()}
    used = _names_the_code_looks_up()
    assert sorted(set(used) - in_file) == [], "looked up but not in job_service/sql/queries.sql"
    assert sorted(in_file - set(used)) == [], "in job_service/sql/queries.sql but used nowhere"
    assert len(in_file) >= 29  # the store's reads, cleanup, retention, webhooks and metrics


def test_every_query_says_what_it_does_and_is_parsed_once() -> None:
    for query in queries().all():
        assert query.doc and query.text, query.name
        assert not query.text.startswith("--"), f"{query.name}: its docstring ran into its SQL"
    assert queries() is queries()


def test_the_input_image_grace_is_the_one_the_job_deletes_use() -> None:
    for name in ("retention_delete_deleted", "retention_delete_expired"):
        assert f"make_interval(secs => {INPUT_BLOB_GRACE_SECONDS})" in queries()[name]


SAMPLE = """-- A header comment, and blank lines, before the first query.

-- name: first
-- What it does,
-- on two lines.
SELECT 1
  FROM t

-- A section comment between queries.
-- name: second
-- Another.
SELECT 2
"""


def test_a_query_is_its_sql_up_to_the_first_blank_line_with_its_docstring() -> None:
    parsed = parse(SAMPLE, "sample.sql")
    assert parsed["first"] == "SELECT 1\n  FROM t"
    assert parsed["second"] == "SELECT 2"
    assert [(q.name, q.doc, q.line) for q in parsed.all()] == [
        ("first", "What it does, on two lines.", 3),
        ("second", "Another.", 10),
    ]


def test_an_unknown_name_fails_its_lookup_naming_the_file() -> None:
    with pytest.raises(UnknownQuery, match=r"no query named 'third' in sample\.sql"):
        parse(SAMPLE, "sample.sql")["third"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            SAMPLE + "\n-- name: first\n-- Again.\nSELECT 3\n",
            r"sample.sql:14: query 'first' is defined twice \(first on line 3\)",
        ),
        ("-- name: bare\nSELECT 1\n", r"sample.sql:1: query 'bare' has no docstring"),
        (
            "-- name: empty\n-- Nothing.\n\n-- name: next\n-- Next.\nSELECT 1\n",
            r"sample.sql:1: query 'empty' has no SQL",
        ),
        ("SELECT 1\n", r"sample.sql:1: SQL outside a query"),
        ("-- name: one\n-- One.\nSELECT 1\n\nSELECT 2\n", r"sample.sql:5: SQL outside a query"),
        ("-- name: Bad-Name\n-- Bad.\nSELECT 1\n", r"sample.sql:1: 'Bad-Name' is not a query name"),
    ],
    ids=["duplicate", "no-docstring", "no-sql", "sql-before-any-name", "sql-after-a-blank-line", "bad-name"],
)
def test_a_malformed_file_fails_loudly(text: str, error: str) -> None:
    with pytest.raises(QueryFileError, match=error):
        parse(text, "sample.sql")
