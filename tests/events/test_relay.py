"""Event changes between replicas (service/events/relay.py) on each database (the SQLite file, then a
real PostgreSQL server: ``make_database``): what one replica publishes reaches the other replica's SSE
subscribers once and in order, never its listeners (webhooks stay with the replica that made the
change), never back to its own; changes from before a replica started are not replayed; a change
committed late below the highest seq seen is still relayed; old rows are deleted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from service.database.base import Database
from service.events.bus import EventBus
from service.events.relay import ChangeLog, EventRelay


def drain(queue: asyncio.Queue) -> list[Any]:
    changes = []
    while not queue.empty():
        changes.append(queue.get_nowait())
    return changes


def test_changes_reach_the_other_replicas_subscribers_once(make_database: Callable[[], Database]) -> None:
    database = make_database()
    ChangeLog(database).add("gone", "opened", {"id": "before"}, 1.0)  # before either replica started

    async def scenario() -> None:
        buses = {name: EventBus() for name in ("a", "b")}
        relays = {name: EventRelay(database, name, bus) for name, bus in buses.items()}
        heard: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
        for name, relay in relays.items():
            relay.attach()
            buses[name].add_listener(lambda kind, event, name=name: heard[name].append((kind, event["id"])))
            await relay.start()
        async with buses["a"].subscribe() as on_a, buses["b"].subscribe() as on_b:
            buses["a"].publish("opened", {"id": "e1", "peak_score": float("nan")})
            buses["a"].publish("updated", {"id": "e1"})
            buses["b"].publish("opened", {"id": "e2"})
            assert await relays["b"].poll() == 2 and await relays["a"].poll() == 1
            assert await relays["b"].poll() == 0 and await relays["a"].poll() == 0  # nothing twice
            assert drain(on_b) == [("opened", {"id": "e2"}), ("opened", {"id": "e1", "peak_score": None}),
                                   ("updated", {"id": "e1"})]
            assert [(kind, event["id"]) for kind, event in drain(on_a)] == [("opened", "e1"), ("updated", "e1"), ("opened", "e2")]
            # listeners (the webhook outbox) hear only their own replica's changes
            assert heard == {"a": [("opened", "e1"), ("updated", "e1")], "b": [("opened", "e2")]}
            # a change committed late with a seq below the highest b has seen is still relayed, once
            # (the row of a's first change is replaced by replica c's, as if c's insert had taken that
            # seq and committed only now)
            late, _, _ = ChangeLog(database).after(relays["b"]._floor, "b")[0]  # noqa: SLF001
            assert late < relays["b"]._highest  # noqa: SLF001
            with database.write() as db:
                db.execute("DELETE FROM event_changes WHERE seq = ?", (late,))
                db.execute("INSERT INTO event_changes (seq, replica, kind, event, at) VALUES (?, 'c', 'closed', "
                           "'{\"id\":\"late\"}', 2.0)", (late,))
            relays["b"]._relayed.discard(late)  # noqa: SLF001 - b has not seen that seq
            assert await relays["b"].poll() == 1 and drain(on_b) == [("closed", {"id": "late"})]
            assert await relays["b"].poll() == 0
        for relay in relays.values():
            await relay.stop()

    asyncio.run(scenario())
    log = ChangeLog(database)
    assert log.prune(older_than=1.5) == 1  # the row from before the start (at 1.0)
    assert [json.loads(event)["id"] for _, _, event in log.after(0, "nobody")] == ["late", "e1", "e2"]
