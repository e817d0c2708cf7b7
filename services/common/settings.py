"""The settings bundle a service is built from: read from the environment once, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from services.common.config import (
    DatabaseSettings,
    ErasureSettings,
    HttpSettings,
    KafkaSettings,
    LinkSettings,
    ProgramSettings,
)


@dataclass(frozen=True)
class CommonSettings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    links: LinkSettings = field(default_factory=LinkSettings)
    program: ProgramSettings = field(default_factory=ProgramSettings)
    erasure: ErasureSettings = field(default_factory=ErasureSettings)

    def with_database(self, service: str) -> CommonSettings:
        """Apply ``KAIKU_<SERVICE>_DATABASE_URL`` / ``_SCHEMA`` overrides for one service."""
        import os

        overrides: dict[str, Any] = {}
        url = os.environ.get(f"KAIKU_{service.upper()}_DATABASE_URL")
        schema = os.environ.get(f"KAIKU_{service.upper()}_DATABASE_SCHEMA")
        if url:
            overrides["url"] = url
        if schema:
            overrides["schema_name"] = schema
        if not overrides:
            return self
        return replace(self, database=self.database.model_copy(update=overrides))
