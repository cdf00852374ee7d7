"""Session fixtures every suite may use: synthetic footage (tests/support.py makes it), a tiny
version trained once, the served registry of the service and reliability suites, and the client and
server factories built on a suite's ``make_settings`` fixture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    registry_copy, synthetic_frames, tiny_model_config, tiny_train_config, train_served_registry, write_frames,
    write_video,
)
from tests.postgres import PostgresServer, PostgresUnavailable

PED2_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ped2"


@pytest.fixture(scope="session")
def normal_footage(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("normal")
    return [write_frames(root / f"clip{i}", synthetic_frames(40, seed=i)) for i in range(2)]


@pytest.fixture(scope="session")
def anomalous_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("anomalous")
    return write_video(root / "anomaly.avi", synthetic_frames(30, seed=5, anomaly_from=15))


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory: pytest.TempPathFactory, normal_footage: list[Path]) -> Path:
    """One tiny version trained once for the whole session (a few seconds)."""
    from model.train import train

    weights = tmp_path_factory.mktemp("weights")
    train(normal_footage, weights, tiny_model_config(), tiny_train_config(), device="cpu",
          show_progress_bar=False)
    return weights


@pytest.fixture(scope="session")
def served_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registry the service and reliability suites serve (tests/support.py train_served_registry):
    v0001 ACTIVE, whose scores put a planted anomaly above every normal frame (checked here), and
    v0002, v0001 with D's bias shifted. Tests copy it (``weights_dir``) before changing it."""
    weights, separation = train_served_registry(tmp_path_factory.mktemp("served"))
    print(f"\nserved v0001 separation: {separation}")
    return weights


@pytest.fixture
def weights_dir(served_weights: Path, tmp_path: Path) -> Path:
    """A test's private copy of the served registry (to activate versions in and tamper with)."""
    return registry_copy(served_weights, tmp_path)


@pytest.fixture
def make_client(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """make_client(**settings) -> a started TestClient (lifespan run); all are closed at teardown."""
    from tests.support import started_clients

    yield from started_clients(make_settings)


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    return make_client()


@pytest.fixture
def live_server(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """live_server(wrap=None, **settings) -> a started uvicorn server; all are stopped at teardown."""
    from tests.support import started_servers

    yield from started_servers(make_settings)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests/postgres.py); where none can be started, the
    tests that need it skip, saying why."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Run the test on each database: None (VAD_DATABASE_URL unset: the SQLite file in the data
    folder), then a fresh PostgreSQL database's URL, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def make_database(database_url: str | None, tmp_path: Path) -> Callable[[], Any]:
    """A new ``service.database`` Database object per call, all on the test's one database (SQLite:
    ``tmp_path/data``), as separate processes would each open it."""
    from service.database import database_for
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    return lambda: database_for(settings)
