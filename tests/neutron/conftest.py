"""The real Neutron 29 agents' code against a real broker: root, podman, netns (see tests/support/fixtures.py)."""

from pathlib import Path

import pytest
from support.fixtures import (  # noqa: F401
    broker,
    broker_runtime,
    dockerd,
    make_broker,
    require_root,
    test_image,
)

NEUTRON = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_root([i for i in items if NEUTRON in Path(str(i.fspath)).parents])
