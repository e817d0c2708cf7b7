"""SMS arithmetic: GSM 03.38 segments, plain punctuation and E.164 numbers."""

from __future__ import annotations

import traceback

import pytest

from services.dispatcher.sms import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    is_gsm7,
    normalize_phone,
    plain_punctuation,
    segments,
)

EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair, two UTF-16 code units


@pytest.mark.parametrize(
    ("text", "encoding", "count"),
    [
        pytest.param("", "GSM-7", 0, id="empty"),
        pytest.param("a", "GSM-7", 1, id="one character"),
        # GSM-7: 160 in one message, 153 per part of a longer one.
        pytest.param("a" * 160, "GSM-7", 1, id="160 septets"),
        pytest.param("a" * 161, "GSM-7", 2, id="161 septets"),
        pytest.param("a" * 306, "GSM-7", 2, id="2 x 153 septets"),
        pytest.param("a" * 307, "GSM-7", 3, id="307 septets"),
        pytest.param("a" * 459, "GSM-7", 3, id="3 x 153 septets"),
        # Finnish and Swedish letters are in the basic set: one septet each.
        pytest.param("äöåÄÖÅ" * 26 + "éÉüÜ", "GSM-7", 1, id="160 Nordic letters"),
        pytest.param("ä" * 161, "GSM-7", 2, id="161 Nordic letters"),
        # Extension characters are escape + character: two septets.
        pytest.param("€" * 80, "GSM-7", 1, id="80 euro signs = 160 septets"),
        pytest.param("€" * 81, "GSM-7", 2, id="81 euro signs = 162 septets"),
        pytest.param("a" * 159 + "[", "GSM-7", 2, id="escape past 160"),
        pytest.param("a" * 158 + "]", "GSM-7", 1, id="escape ending at 160"),
        # A part never ends between the escape and its character.
        pytest.param("a" * 153 + "{" + "a" * 151, "GSM-7", 2, id="escape opens part 2"),
        pytest.param("a" * 152 + "{" + "a" * 151, "GSM-7", 2, id="escape moved to part 2"),
        pytest.param("a" * 152 + "}" + "a" * 152, "GSM-7", 3, id="306 septets, escape at 153"),
        pytest.param("\\^~|\f", "GSM-7", 1, id="more extension characters"),
        # Anything else makes the whole text UCS-2: 70 in one message, 67 per part.
        pytest.param("š" * 70, "UCS-2", 1, id="70 UCS-2"),
        pytest.param("š" * 71, "UCS-2", 2, id="71 UCS-2"),
        pytest.param("a" * 133 + "ž", "UCS-2", 2, id="2 x 67 UCS-2"),
        pytest.param("a" * 134 + "ž", "UCS-2", 3, id="135 UCS-2"),
        pytest.param("a" * 159 + "ç", "UCS-2", 3, id="one character outside GSM-7"),
        pytest.param("Hei – kiitos", "UCS-2", 1, id="en dash"),
        # Emoji are surrogate pairs: two code units, never split across parts.
        pytest.param(EMOJI * 35, "UCS-2", 1, id="35 emoji = 70 units"),
        pytest.param(EMOJI * 35 + "a", "UCS-2", 2, id="71 units"),
        pytest.param("a" * 66 + EMOJI + "a" * 66, "UCS-2", 3, id="134 units, pair at 67"),
        pytest.param("a" * 65 + EMOJI + "a" * 67, "UCS-2", 2, id="pair ends part 1"),
    ],
)
def test_segments(text: str, encoding: str, count: int) -> None:
    assert segments(text) == (encoding, count)


@pytest.mark.parametrize(
    ("character", "gsm7"),
    [
        *((c, True) for c in "äöåÄÖÅéÉüÜ"),
        *((c, True) for c in "@£$¥èùìòÇØøÆæßΔΦΓΛΩΠΨΣΘΞ¡¿§ÑñàÉ\n\r"),
        *((c, True) for c in "€[]{}^~\\|"),
        *((c, False) for c in "šžŠŽçõÕâêáíóúý"),
        *((c, False) for c in "\u2013\u2019\u201c\u2026\t`"),
        (EMOJI, False),
    ],
)
def test_alphabet(character: str, gsm7: bool) -> None:
    assert is_gsm7(character) is gsm7


def test_alphabet_sizes() -> None:
    # 128 code points less the escape; the extension table's ten characters.
    assert len(GSM7_BASIC) == 127
    assert len(GSM7_EXTENSION) == 10
    assert not GSM7_BASIC & GSM7_EXTENSION


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("\u201cHei\u201d \u2013 kiitos\u2026", '"Hei" - kiitos...'),
        ("It\u2019s 9\u00a0\u20ac", "It's 9 €"),
        ("Svara \u00bbSTOP\u00ab", 'Svara "STOP"'),
        ("šž", "šž"),
    ],
)
def test_plain_punctuation(text: str, plain: str) -> None:
    assert plain_punctuation(text) == plain


@pytest.mark.parametrize(
    ("value", "region", "e164"),
    [
        ("+358401234567", None, "+358401234567"),
        ("+358 40 123 4567", None, "+358401234567"),
        ("+358 (0)40 123 4567", None, "+358401234567"),
        ("040 123 4567", "FI", "+358401234567"),
        ("040-1234567", "fi", "+358401234567"),
        ("+46 70 123 45 67", None, "+46701234567"),
        ("070-123 45 67", "SE", "+46701234567"),
        ("00358401234567", "FI", "+358401234567"),
        ("+1 202-555-0125", None, "+12025550125"),
    ],
)
def test_normalize_phone(value: str, region: str | None, e164: str) -> None:
    assert normalize_phone(value, region) == e164


@pytest.mark.parametrize(
    ("value", "region"),
    [
        ("040 123 4567", None),  # national, and no region to read it with
        ("+358 12", None),  # too short
        ("+358401234567890123", None),  # too long
        ("+999 401234567", None),  # no such country code
        ("not a number", "FI"),
        ("", "FI"),
    ],
)
def test_invalid_numbers_are_refused_without_naming_them(value: str, region: str | None) -> None:
    with pytest.raises(ValueError, match="phone number") as info:
        normalize_phone(value, region)
    # Neither the message nor a logged traceback (chained exceptions included) has the number.
    logged = "".join(traceback.format_exception(info.value))
    digits = "".join(c for c in value if c.isdigit())
    assert not digits or digits[-4:] not in logged
    assert not value or value not in logged
