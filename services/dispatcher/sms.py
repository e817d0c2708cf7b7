"""SMS text arithmetic: GSM 03.38 segments and E.164 phone numbers. Pure functions.

An SMS carries 140 octets. Text that uses only the GSM 03.38 default alphabet is sent as GSM-7:
160 septets in a single message, 153 per part of a concatenated one (the user data header takes
the rest). A character of the extension table (``€ [ ] { } ^ ~ \\ |`` and form feed) is an escape
plus the character: two septets, and a part never ends between the two. Any other character
(``š``, ``ž``, ``ç``, typographic quotes, dashes, emoji) makes the whole text UCS-2: 70 UTF-16
code units in one message, 67 per part; a character outside the Basic Multilingual Plane (most
emoji) is a surrogate pair, two units that a part never splits.

National language shift tables (Turkish, Spanish, Portuguese, Indian languages) are not used:
handsets and operators support them unevenly, so such text is counted as UCS-2, the way it is
most often sent.
"""

from __future__ import annotations

from typing import Literal

import phonenumbers

Encoding = Literal["GSM-7", "UCS-2"]

# The default alphabet, in code order (0x1B, the escape to the extension table, left out).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: each is sent as escape + character, two septets.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

SINGLE_GSM7 = 160
MULTI_GSM7 = 153
SINGLE_UCS2 = 70
MULTI_UCS2 = 67


def is_gsm7(text: str) -> bool:
    """Whether ``text`` can be sent in the GSM-7 default alphabet (with its extension table)."""
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def _parts(units: list[int], single: int, multi: int) -> int:
    """How many parts ``units`` (the size of each character, never split) take."""
    if sum(units) <= single:
        return 1 if units else 0
    count, used = 1, 0
    for size in units:
        if used + size > multi:
            count, used = count + 1, 0
        used += size
    return count


def segments(text: str) -> tuple[Encoding, int]:
    """The encoding an SMS of ``text`` is sent in, and how many segments it is billed as.

    An empty text is 0 segments.
    """
    if is_gsm7(text):
        septets = [2 if c in GSM7_EXTENSION else 1 for c in text]
        return "GSM-7", _parts(septets, SINGLE_GSM7, MULTI_GSM7)
    code_units = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return "UCS-2", _parts(code_units, SINGLE_UCS2, MULTI_UCS2)


def _parse_error(error_type: int, value: str, region: str | None) -> str:
    error = phonenumbers.NumberParseException
    if error_type == error.INVALID_COUNTRY_CODE:
        if region or value.lstrip().startswith(("+", "00")):
            return "not a valid phone number: unknown country code"
        return "not a valid phone number: a national number needs a region or a leading +"
    if error_type == error.TOO_LONG:
        return "not a valid phone number: too long"
    if error_type in (error.TOO_SHORT_NSN, error.TOO_SHORT_AFTER_IDD):
        return "not a valid phone number: too short"
    return "not a phone number"


def normalize_phone(value: str, region: str | None = None) -> str:
    """``value`` as an E.164 number (``+358401234567``), or ``ValueError`` when it is not a
    valid number. ``region`` (ISO 3166 alpha-2, e.g. ``FI``) reads national numbers.

    The error never contains the number: it may end up in a log line.
    """
    try:
        number = phonenumbers.parse(value, region.upper() if region else None)
    except phonenumbers.NumberParseException as exc:
        # `from None`: the parser's own exception is not needed (and never holds the number).
        raise ValueError(_parse_error(exc.error_type, value, region)) from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# Typographic punctuation outside GSM-7 and its plain equivalent: one curly quote would make a
# whole SMS UCS-2 (70 characters a segment instead of 160) for no visible gain.
_PLAIN = str.maketrans(
    {
        "\u2018": "'",  # ‘
        "\u2019": "'",  # ’
        "\u201a": "'",  # ‚
        "\u201b": "'",  # ‛
        "\u201c": '"',  # “
        "\u201d": '"',  # ”
        "\u201e": '"',  # „
        "\u00ab": '"',  # «
        "\u00bb": '"',  # »
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2012": "-",  # figure dash
        "\u2013": "-",  # en dash
        "\u2014": "-",  # em dash
        "\u2212": "-",  # minus sign
        "\u2026": "...",  # …
        "\u00a0": " ",  # no-break space
        "\u2009": " ",  # thin space
        "\u202f": " ",  # narrow no-break space
    }
)


def plain_punctuation(text: str) -> str:
    """``text`` with typographic quotes, dashes, ellipses and spaces made plain (GSM-7)."""
    return text.translate(_PLAIN)
