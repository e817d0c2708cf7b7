"""The collector's signed keyset cursors (``cursors.py``), shared by ``/v1/responses`` and
``/v1/scores``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from services.collector.cursors import MAX_CURSOR, Cursors, cursor_key
from services.common.http import ApiError


def as_list(values: list[Any]) -> list[Any]:
    return values


def test_the_longest_scores_position_fits_the_parameter() -> None:
    """Five segment values of 200 characters, none of them ASCII (4 bytes each in UTF-8): the
    cursor still fits ``MAX_CURSOR``, which the API accepts, and reads back the same."""
    cursors = Cursors(cursor_key(SecretStr("token")))
    position = ["s" * 100, "2026-06-01", ["😀" * 200] * 5]
    cursor = cursors.make("report", position)
    assert len(cursor) <= MAX_CURSOR
    assert cursors.read("report", cursor, as_list) == position


@pytest.mark.parametrize(
    ("key", "scope", "message"),
    [
        (b"another key", "report", "not a cursor of this API"),  # another token
        (None, "another report", "made for other filters"),
    ],
)
def test_a_cursor_is_bound_to_its_key_and_scope(
    key: bytes | None, scope: str, message: str
) -> None:
    mine = Cursors(cursor_key(SecretStr("token")))
    cursor = mine.make("report", ["a", 1])
    reader = mine if key is None else Cursors(key)
    with pytest.raises(ApiError) as refused:
        reader.read(scope, cursor, as_list)
    assert (refused.value.status, refused.value.field) == (422, "cursor")
    assert message in refused.value.message
