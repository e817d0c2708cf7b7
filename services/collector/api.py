"""The collector's JSON API: scores."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository, scoring
from services.common.db import unit_of_work
from services.common.events import Metric
from services.common.http import ApiError, ErrorResponse
from services.common.program import Program


class ScoreOut(BaseModel):
    survey: str
    metric: Metric
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None
    promoters: int | None = None
    passives: int | None = None
    detractors: int | None = None
    top_box: int | None = None
    low_n: bool
    target: float | None = None


def router(
    *,
    program: Program,
    sessions: async_sessionmaker[AsyncSession],
    auth: Any,
    min_n: int,
) -> APIRouter:
    api = APIRouter()

    @api.get(
        "/v1/scores",
        response_model=ScoreOut,
        dependencies=[Depends(auth)],
        responses={
            401: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
        summary="The score of a survey",
    )
    async def scores(
        survey: str = Query(description="Survey id from the program"),
        from_: datetime | None = Query(default=None, alias="from"),
        to: datetime | None = None,
    ) -> ScoreOut:
        try:
            definition = program.survey(survey)
        except KeyError:
            raise ApiError(
                404, "unknown_survey", f"no survey {survey!r} in the program", "survey"
            ) from None
        for name, value in (("from", from_), ("to", to)):
            if value is not None and value.tzinfo is None:
                raise ApiError(422, "invalid", "give a time zone (e.g. 2026-11-01T00:00:00Z)", name)
        async with unit_of_work(sessions) as session:
            hist = await repository.score_histogram(session, survey, from_, to)
        result = scoring.score(definition.metric, hist)
        counts: dict[str, int | None] = (
            {
                "promoters": result.promoters,
                "passives": result.passives,
                "detractors": result.detractors,
            }
            if definition.metric == "nps"
            else {"top_box": result.top_box}
        )
        return ScoreOut(
            survey=survey,
            metric=definition.metric,
            n=result.n,
            value=None if result.value is None else round(result.value, 2),
            ci_low=None if result.ci_low is None else round(result.ci_low, 2),
            ci_high=None if result.ci_high is None else round(result.ci_high, 2),
            low_n=result.n < min_n,
            target=definition.target,
            **counts,
        )

    return api
