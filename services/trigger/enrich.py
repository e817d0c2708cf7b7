"""Contact look-ups before the rules run: many vendor webhooks carry only ids (HubSpot events,
Zendesk event webhooks, Intercom conversations). When an event has neither email nor phone, a
trigger wants it, and its source's vendor has a resolver configured, the trigger asks the vendor's
API (bounded time-outs and retries, a short-lived cache). An event whose contact cannot be resolved
goes on to the rules, which record it as skipped with the look-up's reason: never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from prometheus_client import Counter

from services.common.events import CloudEvent, Customer
from services.common.kafka import Incoming
from services.common.logging import bound
from services.common.program import Program
from services.trigger.ingress import Contact, ContactResolver, LookupFailed
from services.trigger.ingress.mapping import normalize_email, normalize_phone

log = logging.getLogger(__name__)

LOOKUPS = Counter(
    "kaiku_contact_lookups_total", "Contact look-ups through vendor APIs", ["vendor", "outcome"]
)

EventKey = tuple[str, str]


@dataclass
class Enricher:
    program: Program
    resolvers: Mapping[str, ContactResolver]
    http: httpx.AsyncClient
    concurrency: int = 10
    # Why a look-up did not give a contact, per event of the latest batch (for the ledger).
    notes: dict[EventKey, str] = field(default_factory=dict)

    def wants(self, event: CloudEvent) -> ContactResolver | None:
        customer = event.data.customer
        if customer.email or customer.phone or not self.program.triggers_for(event.type):
            return None
        return self.resolvers.get(event.source.split("://", 1)[0])

    async def __call__(self, batch: list[Incoming[CloudEvent]]) -> list[Incoming[CloudEvent]]:
        self.notes = {}
        todo = [(i, r) for i, item in enumerate(batch) if (r := self.wants(item.message))]
        if not todo:
            return batch
        sem = asyncio.Semaphore(self.concurrency)
        out = list(batch)

        async def one(index: int, resolver: ContactResolver) -> None:
            event = batch[index].message
            key = (event.source, event.id)
            with bound(event_id=event.id, customer_id=event.customer_id):
                async with sem:
                    try:
                        contact = await resolver.resolve(event, self.http)
                    except LookupFailed as exc:
                        LOOKUPS.labels(vendor=resolver.name, outcome="failed").inc()
                        self.notes[key] = f"{resolver.name} look-up failed: {exc}"
                        log.warning("contact look-up failed: %s", exc)
                        return
                if contact is None:
                    LOOKUPS.labels(vendor=resolver.name, outcome="unknown").inc()
                    self.notes[key] = f"{resolver.name} does not know customer"
                    return
                LOOKUPS.labels(vendor=resolver.name, outcome="found").inc()
                checked = _merge(event.data.customer, contact)
                if contact.customer_id:
                    checked = checked.model_copy(update={"id": contact.customer_id})
                data = event.data.model_copy(update={"customer": checked})
                subject = contact.customer_id or event.subject
                out[index] = Incoming(
                    batch[index].record,
                    event.model_copy(update={"data": data, "subject": subject}),
                )

        await asyncio.gather(*(one(i, r) for i, r in todo))
        return out


def _merge(customer: Customer, contact: Contact) -> Customer:
    """Fill what the event lacks from the vendor, each value checked by the same rules as a
    posted event's (an unusable one is left out rather than failing the event)."""
    filled = customer.model_dump()
    candidates = {
        "email": normalize_email(contact.email),
        "phone": normalize_phone(contact.phone),
        "locale": contact.locale,
        "timezone": contact.timezone,
        "account_id": contact.account_id,
    }
    for name, value in candidates.items():
        if filled.get(name) or value is None:
            continue
        try:
            Customer.model_validate({**filled, name: value})
        except ValueError:
            continue
        filled[name] = value
    return Customer.model_validate(filled)
