"""The webhook sources this deployment accepts: each vendor whose secret is configured."""

from __future__ import annotations

from collections.abc import Callable

from services.trigger.ingress import Vendor, generic

FACTORIES: tuple[Callable[[], Vendor | None], ...] = (generic.from_env,)


def configured() -> dict[str, Vendor]:
    vendors: dict[str, Vendor] = {}
    for factory in FACTORIES:
        vendor = factory()
        if vendor is not None:
            vendors[vendor.name] = vendor
    return vendors
