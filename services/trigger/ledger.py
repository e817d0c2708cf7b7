"""``GET /v1/customers/{id}/decisions``: why was this customer (not) surveyed?"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.db import unit_of_work
from services.common.http import ErrorResponse
from services.trigger import repository


class DecisionOut(BaseModel):
    id: int
    decided_at: datetime
    decision: str  # invited, deferred, skipped, ignored, cancelled
    reason: str  # e.g. trigger_matched, fatigue:<rule>, quiet_hours, coalesced, cancel_on:<type>
    event_id: str
    event_type: str
    event_source: str
    trigger_id: str | None
    survey_id: str | None
    invitation_id: uuid.UUID | None
    next_eligible_at: datetime | None
    detail: dict[str, Any]


class DecisionPage(BaseModel):
    customer_id: str
    decisions: list[DecisionOut]
    # Pass as ``before`` for the next (older) page; null on the last page.
    next_before: int | None


def router(sessions: async_sessionmaker[AsyncSession], auth: Any) -> APIRouter:
    api = APIRouter()

    @api.get(
        "/v1/customers/{customer_id}/decisions",
        response_model=DecisionPage,
        dependencies=[Depends(auth)],
        responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        summary="The decision ledger of one customer, newest first",
    )
    async def decisions(
        customer_id: str,
        limit: int = Query(default=50, ge=1, le=500),
        before: int | None = Query(default=None, ge=1, description="Page back from this id"),
    ) -> DecisionPage:
        async with unit_of_work(sessions) as session:
            rows = await repository.decisions_for(
                session, customer_id, limit=limit + 1, before=before
            )
        page = rows[:limit]
        return DecisionPage(
            customer_id=customer_id,
            decisions=[DecisionOut.model_validate(r, from_attributes=True) for r in page],
            next_before=page[-1].id if len(rows) > limit else None,
        )

    return api
