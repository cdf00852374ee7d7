"""The webhook outbox's table (service/events/outbox.py) on each database (the SQLite file, then a
real PostgreSQL server: ``make_database``): order per URL, the bound sparing deliveries being sent
(claimed), retries, and deliveries to URLs no longer configured."""

from __future__ import annotations

from collections.abc import Callable

from service.database.base import Database
from service.events.outbox import OutboxStore


def test_outbox_order_bound_retries_and_other_urls(make_database: Callable[[], Database]) -> None:
    store = OutboxStore(make_database())
    assert store.count() == 0 and store.head("http://a") is None
    urls = ["http://a", "http://b"]
    assert store.add("opened", {"id": "e1", "score": float("nan")}, urls, 100.0, max_waiting=10) == 0
    assert store.add("closed", {"id": "e1"}, urls, 101.0, max_waiting=10) == 0
    first = store.head("http://a")
    assert (first.kind, first.event, first.attempts, first.next_at) == ("opened", {"id": "e1", "score": None}, 0, 100.0)
    assert store.claim("http://a", "r1", 100.0, 0.0).delivery == first
    assert store.reschedule(first.id, "r1", 1, 160.5) and not store.reschedule(first.id, "r1", 2, 170.0)  # given back
    assert store.head("http://a") == first.__class__(first.id, "http://a", "opened", first.event, 1, 160.5)
    assert store.claim("http://a", "r1", 160.5, 0.0).delivery.attempts == 1
    # 6 deliveries, one being sent: 5 waiting, bound 3: the two oldest waiting go, not the one claimed
    assert store.add("opened", {"id": "e2"}, urls, 102.0, max_waiting=3) == 2
    assert store.count() == 4 and store.head("http://a").id == first.id
    assert (store.head("http://b").kind, store.head("http://b").event) == ("closed", {"id": "e1"})
    assert store.remove(first.id) and not store.remove(first.id)
    assert store.head("http://a").event == {"id": "e2"}
    assert store.remove_other_urls(["http://a"]) == {"http://b": 2}
    assert store.count() == 1 and store.remove_other_urls([]) == {"http://a": 1} and store.count() == 0
