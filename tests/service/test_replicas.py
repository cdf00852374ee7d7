"""Replicas sharing one database, without processes: liveness (service/replicas.py), camera leases
(service/cameras/leases.py), webhook delivery claims (service/events/outbox.py) and whose open events
are closed (service/events/store.py), each on the SQLite file and on a real PostgreSQL server
(``make_database``). Times are passed in (a fake clock): leases expire by arithmetic, not by waiting."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from service.cameras.leases import CameraLeases, fair_share
from service.cameras.store import Camera, CameraStore
from service.database.base import Database
from service.events.outbox import OutboxStore
from service.events.store import EventRecord, EventStore
from service.replicas import Replica, ReplicaStore
from service.settings import Settings

LEASE_S = 15.0
CAP = 32
NewDatabase = Callable[[], Database]


def cameras(database: Database, names: list[str], disabled: tuple[str, ...] = ()) -> CameraStore:
    store = CameraStore(database)
    for name in names:
        store.add(name, f"file:///footage/{name}.avi", 10.0, enabled=name not in disabled)
    return store


def assign(database: Database, replica: str, now: float, cap: int = CAP) -> tuple[set[str], list]:
    """``replica`` heartbeats at ``now`` and assigns: (names held, surplus leases)."""
    ReplicaStore(database).heartbeat(replica, 0.0, now)
    assignment = CameraLeases(database).assign(replica, now, LEASE_S, cap, {})
    return set(assignment.held), assignment.surplus


def owners(database: Database, now: float) -> dict[str, str | None]:
    return {p.camera.name: p.owner for p in CameraLeases(database).placements(now)}


def test_fair_share_is_the_ceiling_of_cameras_over_live_replicas() -> None:
    assert [fair_share(5, 2, 32), fair_share(4, 2, 32), fair_share(4, 3, 32), fair_share(0, 3, 32)] == [3, 2, 2, 0]
    assert fair_share(10, 1, 4) == 4 and fair_share(3, 0, 32) == 3


def test_replicas_are_live_until_their_lease_runs_out(make_database: NewDatabase) -> None:
    store = ReplicaStore(make_database())
    store.heartbeat("a", 1.0, 100.0)
    store.heartbeat("b", 2.0, 105.0)
    assert [r.id for r in store.live(100.0 - LEASE_S)] == ["a", "b"]
    assert [r.id for r in store.live(104.0)] == ["b"]  # a was last seen at 100: dead from 100 + lease on
    assert store.sweep(104.0) == ["a"] and [r.id for r in store.live(0.0)] == ["b"]
    store.heartbeat("a", 1.0, 120.0)  # a replica thought dead comes back: registered again
    assert [(r.id, r.started_at, r.last_seen) for r in store.live(0.0)] == [("a", 1.0, 120.0), ("b", 2.0, 105.0)]
    store.remove("b")
    assert [r.id for r in store.live(0.0)] == ["a"]


def test_a_new_replica_gets_its_share_and_every_camera_has_one_owner(make_database: NewDatabase) -> None:
    database = make_database()
    names = [f"c{i}" for i in range(5)]
    cameras(database, [*names, "off"], disabled=("off",))
    assert assign(database, "a", 100.0) == (set(names), [])  # alone: all five
    assert assign(database, "b", 101.0) == (set(), [])  # a's leases stand; b's share (3) waits for a
    held, surplus = assign(database, "a", 102.0)  # two live: a keeps ceil(5 / 2) = 3, gives up its last two
    assert held == {"c0", "c1", "c2"} and [lease.camera.name for lease in surplus] == ["c3", "c4"]
    CameraLeases(database).release("a", surplus)
    assert owners(database, 102.5) == {"c0": "a", "c1": "a", "c2": "a", "c3": None, "c4": None, "off": None}
    assert assign(database, "b", 103.0) == ({"c3", "c4"}, [])
    assert owners(database, 103.0) == {"c0": "a", "c1": "a", "c2": "a", "c3": "b", "c4": "b", "off": None}
    assert assign(database, "a", 104.0) == ({"c0", "c1", "c2"}, []) and assign(database, "b", 104.0) == ({"c3", "c4"}, [])
    generations = {p.camera.name: p.generation for p in CameraLeases(database).placements(104.0)}
    assert generations == {"c0": 1, "c1": 1, "c2": 1, "c3": 2, "c4": 2, "off": 0}  # a claim is a new generation


def test_a_dead_replicas_cameras_are_taken_over_and_its_late_writes_change_nothing(
    make_database: NewDatabase, tmp_path: Path,
) -> None:
    database = make_database()
    cameras(database, ["c0", "c1"])
    leases = CameraLeases(database)
    assign(database, "a", 100.0)
    assign(database, "b", 100.0)
    assert assign(database, "a", 100.0)[0] == {"c0"}  # a gave c1 up ...
    CameraLeases(database).release("a", [lease for lease in leases.assign("a", 100.0, LEASE_S, 1, {}).surplus])
    assert assign(database, "b", 100.5)[0] == {"c1"}  # ... and b took it, generation 2
    assert assign(database, "a", 110.0)[0] == {"c0"}  # b silent for 9.5 s: alive, its camera stays its

    b_generation = {p.camera.name: p.generation for p in leases.placements(110.0)}["c1"]
    events = EventStore(database, tmp_path / "data")
    record = EventRecord(id=uuid.uuid4().hex, camera="c1", source="camera", state="open", start_at=100.0, end_at=None,
                         last_at=100.0, peak_score=2.0, peak_frame=3, model_version="v0001", frames=3, replica="b")

    def b_fence(connection: object) -> bool:
        return leases.holds(connection, "c1", "b", b_generation)  # type: ignore[arg-type]

    assert events.save(record, b_fence)  # b holds c1: its event is written
    held, _ = assign(database, "a", 100.5 + LEASE_S + 1)  # b silent past its lease: dead, c1 is a's
    assert held == {"c0", "c1"} and owners(database, 117.0) == {"c0": "a", "c1": "a"}
    record.frames, record.last_at = 40, 105.0
    assert not events.save(record, b_fence)  # b wakes up and writes: fenced off, the row is unchanged
    assert events.get(record.id).frames == 3
    assert assign(database, "b", 118.0)[0] == set()  # b's renewal renews nothing: it stops c1
    assert [e.id for e in events.close_open("camera", "c1")] == [record.id]  # what a closes as it takes c1 over
    record.state = "closed"
    assert not events.save(record)  # a closed event is final, whoever writes


def test_a_clean_stop_releases_at_once_and_disabled_cameras_run_nowhere(make_database: NewDatabase) -> None:
    database = make_database()
    store = cameras(database, ["c0", "c1", "c2"])
    held, _ = assign(database, "a", 100.0)
    assert held == {"c0", "c1", "c2"}
    assignment = CameraLeases(database).assign("a", 100.0, LEASE_S, CAP, {})
    CameraLeases(database).release("a", list(assignment.held.values()))  # a stops: no waiting for its lease ...
    ReplicaStore(database).remove("a")  # ... and leaves
    assert assign(database, "b", 100.0) == ({"c0", "c1", "c2"}, [])
    store.update(Camera("c1", "file:///footage/c1.avi", 10.0, False, 0.0, 0.0))
    assert assign(database, "b", 101.0)[0] == {"c0", "c2"}  # disabled: not held (b stops it)
    assert assign(database, "c", 101.0)[0] == set()
    assert assign(database, "a", 101.0, cap=1)[0] == set()  # VAD_MAX_CAMERAS caps a share too


def test_replicas_claiming_at_once_take_each_camera_once(make_database: NewDatabase) -> None:
    database = make_database()
    names = [f"cam{i:02d}" for i in range(12)]
    cameras(database, names)
    replicas = ["r0", "r1", "r2", "r3"]
    for replica in replicas:
        ReplicaStore(database).heartbeat(replica, 0.0, 100.0)
    start = threading.Barrier(len(replicas))
    held: dict[str, set[str]] = {}
    failures: list[BaseException] = []

    def replica_process(replica: str) -> None:
        leases = CameraLeases(make_database())  # its own connections, as another process's
        try:
            start.wait()
            held[replica] = set(leases.assign(replica, 100.0, LEASE_S, CAP, {}).held)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=replica_process, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    claimed = [name for names_held in held.values() for name in names_held]
    assert sorted(claimed) == names  # each camera once, none left over
    assert all(len(names_held) == 3 for names_held in held.values())  # ceil(12 / 4) each
    assert set(owners(database, 100.0).values()) == set(replicas)


def test_webhook_claims_keep_one_sender_per_url_and_pass_on_when_it_dies(make_database: NewDatabase) -> None:
    database = make_database()
    outbox, replicas = OutboxStore(database), ReplicaStore(database)
    outbox.add("opened", {"id": "e1"}, ["http://a", "http://b"], 100.0, max_waiting=10)
    outbox.add("closed", {"id": "e1"}, ["http://a"], 100.0, max_waiting=10)
    replicas.heartbeat("x", 0.0, 100.0)
    replicas.heartbeat("y", 0.0, 100.0)
    live_since = 100.0 - LEASE_S
    first = outbox.claim("http://a", "x", 100.0, live_since).delivery
    assert first is not None and first.kind == "opened"
    assert outbox.claim("http://a", "y", 100.0, live_since).delivery is None  # x sends a's head; y waits, in order
    other = outbox.claim("http://b", "y", 100.0, live_since).delivery  # another URL: another sender
    assert other is not None and other.url == "http://b"
    assert outbox.remove(first.id)
    second = outbox.claim("http://a", "y", 101.0, live_since).delivery
    assert second is not None and second.kind == "closed"
    assert outbox.claim("http://a", "x", 110.0, 110.0 - LEASE_S).delivery is None  # y is alive: its claim stands
    replicas.heartbeat("x", 0.0, 120.0)  # y silent since 100: dead at 115
    taken = outbox.claim("http://a", "x", 120.0, 120.0 - LEASE_S).delivery
    assert taken == second  # the same delivery (same id): sent at least once
    assert not outbox.reschedule(second.id, "y", 1, 130.0)  # y's late failure report changes nothing
    assert outbox.reschedule(second.id, "x", 1, 130.0)
    assert outbox.claim("http://a", "x", 121.0, 121.0 - LEASE_S).due_in == pytest.approx(9.0)  # not due yet
    assert outbox.release("y") == 1  # y's claim on b's head, given back at its stop
    assert outbox.claim("http://b", "x", 122.0, 122.0 - LEASE_S).delivery == other


def test_a_replica_closes_its_own_and_dead_replicas_open_events_not_live_ones(
    make_database: NewDatabase, tmp_path: Path,
) -> None:
    database = make_database()
    replicas, events = ReplicaStore(database), EventStore(database, tmp_path / "data")
    replicas.heartbeat("me", 0.0, 200.0)
    replicas.heartbeat("live", 0.0, 195.0)
    replicas.heartbeat("dead", 0.0, 150.0)
    ids = {}
    for owner in ("me", "live", "dead", None):
        ids[owner] = uuid.uuid4().hex
        events.save(EventRecord(id=ids[owner], camera=f"cam-{owner}", source="camera", state="open", start_at=100.0,
                                end_at=None, last_at=107.5, peak_score=2.0, peak_frame=3, model_version="v0001",
                                frames=3, replica=owner))
    live_since = 200.0 - LEASE_S
    periodic = events.close_dangling(live_since, "me", own=False)  # at a heartbeat: only the dead's (and nobody's)
    assert sorted(e.id for e in periodic) == sorted([ids["dead"], ids[None]])
    assert all(e.state == "closed" and e.end_at == 107.5 for e in periodic)
    at_start = events.close_dangling(live_since, "me")  # a start under the same id: its own from before too
    assert [e.id for e in at_start] == [ids["me"]]
    assert events.get(ids["live"]).state == "open"  # a live replica's event is its own to close


def test_a_replica_heartbeats_runs_its_ticks_and_leaves_at_stop(make_database: NewDatabase, tmp_path: Path) -> None:
    database = make_database()
    now = [1000.0]
    settings = Settings(data_dir=tmp_path / "data", replica_id="replica-a", replica_lease_s=3.0)
    replica = Replica(settings, database, clock=lambda: now[0])
    assert (replica.id, replica.interval_s) == ("replica-a", 1.0)
    assert Replica(Settings(data_dir=tmp_path / "data", replica_id="")).id != Replica(Settings(data_dir=tmp_path)).id
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(now[0])

    async def run() -> None:
        await replica.start()
        replica.on_tick(tick)
        ReplicaStore(database).heartbeat("gone", 0.0, 990.0)
        now[0] = 1002.0
        await replica.heartbeat()
        await replica.tick()
        assert [(r.id, r.last_seen) for r in replica.store.live(0.0)] == [("replica-a", 1002.0)]  # gone: swept
        await replica.stop()

    asyncio.run(run())
    assert ticks == [1002.0] and ReplicaStore(database).live(0.0) == []
