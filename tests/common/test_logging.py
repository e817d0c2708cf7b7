"""No token, email address or phone number in a log line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from services.common import logging as kaiku_logging
from services.common.events import Customer


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # Another test's uvicorn may have configured its loggers (own handlers, no propagation):
    # here they log through the root, as under kaiku's services (log_config=None).
    saved = []
    for name in ("uvicorn", "uvicorn.access"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, logger.handlers[:]))
        logger.setLevel(logging.INFO)
        logger.propagate = True
        logger.handlers[:] = []
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger, lvl, propagate, hs in saved:
        logger.level, logger.propagate, logger.handlers[:] = lvl, propagate, hs


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_lines_hide_survey_link_tokens(fmt: str) -> None:
    out = io.StringIO()
    kaiku_logging.configure("INFO", fmt, out)
    token = "0uAvfstvkD2TAR37J7fsdjF2_CvdH"
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", f"/s/{token}?score=9", "1.1", 200
    )
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "POST", f"/u/{token}", "1.1", 200
    )
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:1",
        "POST",
        "/v1/webhooks/salesforce?token=s3cr3t-value&x=1",
        "1.1",
        200,
    )
    err = out.getvalue()
    assert "s3cr3t-value" not in err
    assert "/v1/webhooks/salesforce?token=<redacted>&x=1" in err
    assert token not in err
    assert "/s/<token>?score=9" in err
    assert "/u/<token>" in err


def test_contact_details_stay_out_of_reprs() -> None:
    customer = Customer(id="c-1", email="aino@example.fi", phone="+358401234567")
    assert "aino" not in repr(customer)
    assert "358401234567" not in repr(customer)
    assert "c-1" in repr(customer)
