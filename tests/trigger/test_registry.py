"""Every vendor module is wired in: its webhook source and its contact resolver."""

from __future__ import annotations

import importlib

from services.common.program import VENDORS
from services.trigger.ingress import registry


def test_every_vendor_and_resolver_is_registered() -> None:
    sources = {f.__module__.rsplit(".", 1)[1] for f in registry.FACTORIES}
    resolvers = {f.__module__.rsplit(".", 1)[1] for f in registry.RESOLVER_FACTORIES}
    assert sources == set(VENDORS)
    with_resolvers = {
        name
        for name in VENDORS
        if hasattr(importlib.import_module(f"services.trigger.ingress.{name}"), "resolver_from_env")
    }
    assert resolvers == with_resolvers
    assert with_resolvers == set(VENDORS) - {"generic"}


def test_a_source_is_enabled_by_its_secret(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in VENDORS:
        monkeypatch.delenv(f"KAIKU_{name.upper()}_WEBHOOK_SECRET", raising=False)
    assert registry.configured() == {}
    monkeypatch.setenv("KAIKU_GENERIC_WEBHOOK_SECRET", "whsec_a2Fpa3Utc2VjcmV0LWtleQ==")
    assert set(registry.configured()) == {"generic"}
