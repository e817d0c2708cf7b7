"""``DELETE /v1/customers/{id}``: erasure (GDPR) across all services.

In one transaction the collector scrubs its own tables (``repository.erase_customer``: answers
keep their scores without identity) and records the erasure in ``collector_erasures``, its outbox
for ``kaiku.optouts``: the relay publishes ``CustomerErased`` there, keyed by the customer id, and
the trigger and the dispatcher erase what they hold. The customer id stays in the outbox row only
until the event is published; afterwards only its salted hash remains.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository
from services.common.db import unit_of_work
from services.common.erasure import customer_hash
from services.common.events import utcnow
from services.common.http import ErrorResponse

log = logging.getLogger(__name__)


class ErasureAccepted(BaseModel):
    erasure_id: uuid.UUID
    requested_at: datetime
    # Every service erases the customer once it has read the event from kaiku.optouts.
    status: str = "accepted"


async def erase(
    session: AsyncSession, customer_id: str, salt: SecretStr | str, now: datetime
) -> uuid.UUID:
    """Scrub the customer from the collector and queue the ``CustomerErased`` event. Repeating it
    is harmless: the scrub finds nothing left, and the services erase again, idempotently."""
    erasure_id = uuid.uuid4()
    hashed = customer_hash(salt, customer_id)
    await repository.erase_customer(session, customer_id, hashed, now)
    await repository.add_erasure(
        session,
        {
            "erasure_id": erasure_id,
            "customer_id": customer_id,
            "customer_hash": hashed,
            "requested_at": now,
            "published_at": None,
        },
    )
    return erasure_id


def router(
    *,
    sessions: async_sessionmaker[AsyncSession],
    auth: Any,
    salt: SecretStr,
    on_change: Callable[[], None],
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    api = APIRouter()

    @api.delete(
        "/v1/customers/{customer_id}",
        status_code=202,
        response_model=ErasureAccepted,
        dependencies=[Depends(auth)],
        responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        summary="Erase a customer's personal data in every service",
    )
    async def erase_customer(
        customer_id: Annotated[str, Path(min_length=1, max_length=200)],
    ) -> ErasureAccepted:
        now = clock()
        async with unit_of_work(sessions) as session:
            erasure_id = await erase(session, customer_id.strip() or customer_id, salt, now)
        log.info("erasure %s accepted", erasure_id)
        on_change()
        return ErasureAccepted(erasure_id=erasure_id, requested_at=now)

    return api
