"""Export the JSON Schemas in ``schemas/`` from the models (the single public definition)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from services.common import events
from services.common.program import Program

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _schema(model: Any, schema_id: str, title: str) -> dict[str, Any]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        schema = model.model_json_schema(mode="validation")
    else:
        schema = TypeAdapter(model).json_schema(mode="validation")
    return {"$schema": DRAFT, "$id": schema_id, **schema, "title": title}


def documents() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for topic, model in events.TOPIC_MODELS.items():
        docs[f"topic.{topic}.schema.json"] = _schema(
            model,
            f"https://kaiku.dev/schemas/topic.{topic}.schema.json",
            f"kaiku.{topic}: {getattr(model, '__name__', 'one of ' + topic)}",
        )
    docs["program.schema.json"] = _schema(
        Program, "https://kaiku.dev/schemas/program.schema.json", "kaiku survey program"
    )
    return docs


def _render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in documents().items():
        path = directory / name
        path.write_text(_render(doc), encoding="utf-8")
        written.append(path)
    return written


def check(directory: Path) -> list[str]:
    """Lines naming each schema file that differs from the models (empty when they agree)."""
    drift = []
    for name, doc in documents().items():
        path = directory / name
        if not path.exists():
            drift.append(f"{path}: missing (run `make schemas`)")
        elif path.read_text(encoding="utf-8") != _render(doc):
            drift.append(f"{path}: differs from the models (run `make schemas`)")
    return drift
