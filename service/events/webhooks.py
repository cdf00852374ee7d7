"""Webhooks: every event opened and closed is POSTed, signed, to each URL of VAD_WEBHOOK_URLS.

``WebhookOutbox.attach(bus)`` makes each change one delivery per URL, written to the persistent
outbox (``service/events/outbox.py``) inside the bus's publish, so a change published is a change
delivered even across a restart (at least once: a delivery cut off by a shutdown is sent again).
``start()`` runs one sender task per URL: each sends its URL's deliveries oldest first, so a slow or
dead receiver only delays its own deliveries. Replicas sharing the database all run senders for every
URL; a sender claims the head of its URL's queue before sending it (service/events/outbox.py), so each
delivery is sent by one replica at a time and each URL's order is kept across replicas. The sender of
the replica that published a change is woken at once; the others look every heartbeat interval (they
take over the queue of a replica that stopped, or the claim of one that died). Delivery is exactly
once without crashes, at least once across a crash (or a replica thought dead) between sending and
removing. A delivery is

    POST <url>
    Content-Type: application/json
    X-VAD-Event: opened | closed
    X-VAD-Delivery: <32 hex, the same on every attempt>
    X-VAD-Signature: sha256=<hex HMAC-SHA256 of the body bytes with VAD_WEBHOOK_SECRET>  (when set)

    {"type": "opened", "event": {...}, "delivery": "<id>", "sent_at": "<ISO-8601 UTC>"}

A 2xx answer delivers it; any other answer, a timeout or a connection error is retried after
VAD_WEBHOOK_RETRY_INITIAL_S, doubling up to VAD_WEBHOOK_RETRY_MAX_S, and dropped (with a log line)
after VAD_WEBHOOK_MAX_ATTEMPTS attempts. Beyond VAD_WEBHOOK_OUTBOX_MAX waiting deliveries the oldest
are dropped. The secret is never logged; URLs are logged as scheme://host:port only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.background import cancel_and_wait
from service.database import database_errors
from service.events.bus import EventBus
from service.events.outbox import Delivery, OutboxStore
from service.events.store import iso_utc
from service.metrics import Metrics
from service.replicas import Replica
from service.settings import Settings

log = logging.getLogger("vad.webhooks")

DELIVERED_KINDS = ("opened", "closed")  # "updated" changes are for SSE only
DATABASE_RETRY_S = 5.0  # a sender whose outbox read or write failed (disk, lock) tries again after this


def signature(secret: str, body: bytes) -> str:
    """The X-VAD-Signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def shown_url(url: str) -> str:
    """``url`` fit for a log line: scheme, host and port only (a user:password part, and paths that
    carry a token, as many webhook URLs do, stay out of logs)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}/..." if parts.path not in ("", "/") or parts.query else f"{parts.scheme}://{host}"


def retry_delay(settings: Settings, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1, 2, ...)."""
    return min(settings.webhook_retry_initial_s * 2 ** (attempts - 1), settings.webhook_retry_max_s)


class WebhookOutbox:
    """The persistent outbox and its senders (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics, replica: Replica | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.replica = replica or Replica(settings)
        self.urls = list(settings.webhook_urls)
        self.store = OutboxStore(self.replica.database)
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        self._secret = secret or None  # an empty secret signs nothing
        self._wakes: dict[str, asyncio.Event] = {}
        self._senders: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    def attach(self, bus: EventBus) -> None:
        """Persist every opened/closed change published on ``bus`` (nothing to do without URLs)."""
        if self.urls:
            bus.add_listener(self._on_change)

    def _on_change(self, kind: str, event: dict[str, Any]) -> None:
        if kind not in DELIVERED_KINDS:
            return
        dropped = self.store.add(kind, event, self.urls, time.time(), self.settings.webhook_outbox_max)
        if dropped:
            log.warning("webhook outbox full (%d): dropped the %d oldest deliveries", self.settings.webhook_outbox_max, dropped)
            self.metrics.webhook_deliveries.labels("dropped").inc(dropped)
        self._update_gauge()
        for wake in self._wakes.values():
            wake.set()

    async def start(self) -> None:
        """Drop deliveries to URLs no longer configured, then start one sender per URL."""
        if not self.urls and not self.store.database.exists():
            return  # no webhooks and no database: nothing to create
        for url, count in self.store.remove_other_urls(self.urls).items():
            log.warning("dropped %d webhook deliveries to %s: no longer in VAD_WEBHOOK_URLS", count, shown_url(url))
            self.metrics.webhook_deliveries.labels("dropped").inc(count)
        self._update_gauge()
        if not self.urls:
            return
        self._client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s)
        for url in self.urls:
            self._wakes[url] = asyncio.Event()
            self._senders.append(asyncio.create_task(self._send_all(url), name=f"vad-webhook-{shown_url(url)}"))

    async def stop(self) -> None:
        """Stop sending; what is still waiting stays in the outbox for another replica or the next start
        (a claim cut off here is given back: that delivery is sent again)."""
        for task in self._senders:
            await cancel_and_wait(task)
        if self._senders:
            try:
                await asyncio.to_thread(self.store.release, self.replica.id)
            except database_errors():
                log.warning("webhook outbox: could not give back this replica's claims; they pass to another once it is dead")
        self._senders.clear()
        self._wakes.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _send_all(self, url: str) -> None:
        """Send ``url``'s deliveries oldest first, each until delivered or dropped."""
        while True:
            try:
                await self._send_next(url)
            except database_errors():
                log.exception("webhook outbox of %s: database error; trying again in %.0f s", shown_url(url), DATABASE_RETRY_S)
                await asyncio.sleep(DATABASE_RETRY_S)

    async def _send_next(self, url: str) -> None:
        """Claim and attempt ``url``'s oldest delivery if it is due, else wait until it is, a change
        arrives, or a heartbeat interval has passed (another replica's queue or claim may be ours now)."""
        wake = self._wakes[url]
        wake.clear()  # before reading, so an insert after the read still wakes us
        claim = await asyncio.to_thread(self.store.claim, url, self.replica.id, time.time(), self.replica.live_since())
        if claim.delivery is None:
            wait = self.replica.interval_s if claim.due_in is None else min(claim.due_in, self.replica.interval_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)  # woken early: the head may have been dropped
            return
        await self._attempt(claim.delivery)

    async def _attempt(self, delivery: Delivery) -> None:
        error = await self._post(delivery)
        attempts = delivery.attempts + 1
        if error is None:
            await asyncio.to_thread(self.store.remove, delivery.id)
            self.metrics.webhook_deliveries.labels("delivered").inc()
        else:
            self.metrics.webhook_deliveries.labels("failed").inc()
            if attempts >= self.settings.webhook_max_attempts:
                await asyncio.to_thread(self.store.remove, delivery.id)
                self.metrics.webhook_deliveries.labels("dropped").inc()
                log.error(
                    "webhook delivery %s (%s of event %s) to %s dropped after %d attempts: %s", delivery.id,
                    delivery.kind, delivery.event.get("id"), shown_url(delivery.url), attempts, error,
                )
            else:
                delay = retry_delay(self.settings, attempts)
                await asyncio.to_thread(self.store.reschedule, delivery.id, self.replica.id, attempts, time.time() + delay)
                log.info(
                    "webhook delivery %s to %s failed (attempt %d of %d: %s); retrying in %.1f s", delivery.id,
                    shown_url(delivery.url), attempts, self.settings.webhook_max_attempts, error, delay,
                )
        self._update_gauge()

    async def _post(self, delivery: Delivery) -> str | None:
        """One attempt; None when the receiver answered 2xx, else what went wrong."""
        assert self._client is not None
        sent_at = iso_utc(time.time())
        body = json.dumps(
            {"type": delivery.kind, "event": delivery.event, "delivery": delivery.id, "sent_at": sent_at},
            separators=(",", ":"),
        ).encode()
        headers = {"Content-Type": "application/json", "X-VAD-Event": delivery.kind, "X-VAD-Delivery": delivery.id}
        if self._secret is not None:
            headers["X-VAD-Signature"] = signature(self._secret, body)
        try:
            response = await self._client.post(delivery.url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def _update_gauge(self) -> None:
        self.metrics.webhook_outbox.set(self.store.count())
