from __future__ import annotations

import pytest

from services.common.tokens import InvalidToken, LinkKeys


def test_tokens_are_short_unique_and_verify_across_key_rotation() -> None:
    old = LinkKeys.parse("a:first-secret-0123456789")
    token = old.issue()
    assert len(token) <= 32
    assert len({old.issue() for _ in range(1000)}) == 1000
    rotated = LinkKeys.parse("b:second-secret-012345678,a:first-secret-0123456789")
    assert rotated.verify(token) == token  # old links keep working
    assert rotated.issue().startswith("b")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # tampered signature
        lambda t: t[:5] + ("x" if t[5] != "x" else "y") + t[6:],  # tampered id
        lambda t: "z" + t[1:],  # unknown key id
        lambda t: t + "A",  # wrong length
        lambda t: t[:10] + "/" + t[11:],  # not URL-safe
    ],
)
def test_tampered_tokens_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    keys = LinkKeys.parse("a:first-secret-0123456789")
    with pytest.raises(InvalidToken):
        keys.verify(mutate(keys.issue()))


def test_weak_key_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="kid:secret"):
        LinkKeys.parse("a:short")
