"""Fixtures for integration tests that drive real podman, network namespaces and daemons.

The broker fixtures (``test_image``, ``broker``, ``make_broker``) and the root check come from
tests/support/fixtures.py (shared with tests/neutron); helpers live in tests/support/netlab.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import netlab
from support.fixtures import (  # noqa: F401
    broker,
    broker_runtime,
    dockerd,
    make_broker,
    require_root,
    test_image,
)

INTEGRATION = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_root([i for i in items if INTEGRATION in Path(str(i.fspath)).parents])


@pytest.fixture
def netns_pair() -> Iterator[netlab.NetnsPair]:
    """A fresh server/client netns pair (10.250.N.1/24 on the server side, nothing on the client)."""
    with netlab.NetnsPair() as pair:
        yield pair


@pytest.fixture
def container_label() -> Iterator[str]:
    """A unique ``safespawn.test=<token>`` label; every container carrying it is removed afterwards."""
    label = f"{netlab.TEST_LABEL}={netlab.unique_name()}"
    yield label
    netlab.podman_rm_by_label(label)


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """A directory to bind-mount into sidecars at the same path (mode 0755, so a daemon that drops
    to an unprivileged user can still read the files the test writes there)."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o755)
    return d
