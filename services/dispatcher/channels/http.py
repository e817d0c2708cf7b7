"""What the HTTP providers share: one client, a request that never raises, ``Retry-After``.

A provider module builds its request as its documentation states and classifies the answer
itself (each vendor's error codes mean different things); this module turns what is the same
everywhere into ``SendResult``: no connection, a timeout, 429 and 5xx are transient.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx

from services.common.http import retry_after_seconds
from services.dispatcher.channels import OutboundEmail, SendResult

log = logging.getLogger(__name__)

USER_AGENT = "kaiku-dispatcher"


def client(base_url: str, timeout: float, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=timeout,
        headers={"user-agent": USER_AGENT},
        **kwargs,
    )


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), if any."""
    return retry_after_seconds(response.headers.get("retry-after"))


async def request(
    http: httpx.AsyncClient, provider: str, method: str, url: str, **kwargs: Any
) -> httpx.Response | SendResult:
    """The provider's answer, or a transient ``SendResult`` when there was none."""
    try:
        return await http.request(method, url, **kwargs)
    except httpx.TimeoutException:
        return SendResult("transient", reason=f"{provider}: timed out")
    except httpx.HTTPError as exc:
        return SendResult("transient", reason=f"{provider}: {type(exc).__name__}")


def generic_failure(provider: str, response: httpx.Response, detail: str = "") -> SendResult:
    """The classification every HTTP API shares: 408, 429 and 5xx are worth retrying; any other
    4xx is not (the request itself is wrong: credentials, a field, the account)."""
    status = response.status_code
    what = f"{provider} {status}" + (f": {detail}" if detail else "")
    if status in (408, 425, 429) or status >= 500:
        return SendResult("transient", reason=what, retry_after=retry_after(response))
    return SendResult("permanent", reason=what)


def json_body(response: httpx.Response) -> Any:
    """The answer's JSON, or None when it is not JSON."""
    try:
        return response.json()
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or an empty one."""
    body = json_body(response)
    return body if isinstance(body, dict) else {}


# Vendors repeat the recipient in their messages; a reason is logged, so it must not.
_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:]+@[^\s<>()\[\]\"',;:]+")
_PHONE_LIKE = re.compile(r"\+?\d[\d\s().-]{4,}\d")


def redact_addresses(text: str, limit: int = 300) -> str:
    """``text`` without email addresses, on one line and bounded (email providers)."""
    return " ".join(_ADDRESS.sub("<address>", text).split())[:limit]


def redact_numbers(text: str, limit: int = 200) -> str:
    """``text`` without anything that looks like a phone number, on one line and bounded (SMS
    providers; not for email reasons, where it would eat SMTP status codes)."""
    return _PHONE_LIKE.sub("<number>", " ".join(text.split()))[:limit]


# The headers of the rendered email that the HTTP email APIs (SendGrid, Mailgun) carry as custom
# headers: the rest of the message is rebuilt by the provider from the request's fields.
PASSED_HEADERS = (
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Auto-Submitted",
    "X-Kaiku-Invitation",
)
_FOLD = re.compile(r"\r?\n[ \t]*")


def passed_headers(message: OutboundEmail) -> list[tuple[str, str]]:
    """The ``PASSED_HEADERS`` the email has, each unfolded to one line."""
    found = []
    for name in PASSED_HEADERS:
        value = header(message, name)
        if value is not None and value.strip():
            found.append((name, _FOLD.sub(" ", value).strip()))
    return found


def header(message: OutboundEmail, name: str) -> str | None:
    """A header of the email, by case-insensitive name."""
    for key, value in message.headers.items():
        if key.lower() == name.lower():
            return value
    found = message.message.get(name)
    return None if found is None else str(found)


class HttpProvider:
    """The HTTP client of a provider: made here (and closed by ``aclose``) unless one is handed
    in, which then belongs to the caller."""

    def __init__(self, http: httpx.AsyncClient | None, timeout: float) -> None:
        self._owns_http = http is None
        self._http = http or client("", timeout)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()
