"""The webhook sources this deployment accepts: each vendor whose secret is configured."""

from __future__ import annotations

from collections.abc import Callable

from services.trigger.ingress import (
    ContactResolver,
    Vendor,
    freshdesk,
    generic,
    hubspot,
    intercom,
    salesforce,
    servicenow,
    zendesk,
)

FACTORIES: tuple[Callable[[], Vendor | None], ...] = (
    generic.from_env,
    hubspot.from_env,
    zendesk.from_env,
    intercom.from_env,
    freshdesk.from_env,
    servicenow.from_env,
    salesforce.from_env,
)


def configured() -> dict[str, Vendor]:
    vendors: dict[str, Vendor] = {}
    for factory in FACTORIES:
        vendor = factory()
        if vendor is not None:
            vendors[vendor.name] = vendor
    return vendors


RESOLVER_FACTORIES: tuple[Callable[[], ContactResolver | None], ...] = (
    hubspot.resolver_from_env,
    zendesk.resolver_from_env,
    intercom.resolver_from_env,
    freshdesk.resolver_from_env,
    servicenow.resolver_from_env,
    salesforce.resolver_from_env,
)


def resolvers() -> dict[str, ContactResolver]:
    """The vendors whose API credentials are configured, for contact look-ups."""
    found: dict[str, ContactResolver] = {}
    for factory in RESOLVER_FACTORIES:
        resolver = factory()
        if resolver is not None:
            found[resolver.name] = resolver
    return found
