"""Fixtures shared by the suites that drive real podman (tests/integration, tests/neutron).

Their conftest files import them by name; the root check refuses the run before any test starts.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.broker import REPO, TEST_IMAGE, Broker


def require_root(items: list[pytest.Item]) -> None:
    """Refuse the whole run when it collects real-component tests and we are not root."""
    if items and os.geteuid() != 0:
        raise pytest.UsageError("safespawn's integration tests drive real podman and netns: run them as root "
                                "(the unit tests, `pytest tests/unit`, run as any user)")


@pytest.fixture(scope="session")
def test_image() -> str:
    """The local sidecar image built from the host's binaries (scripts/build-test-image)."""
    subprocess.run(["bash", str(REPO / "scripts" / "build-test-image"), TEST_IMAGE], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return TEST_IMAGE


@pytest.fixture
def broker(tmp_path: Path, test_image: str) -> Iterator[Broker]:
    """A real broker with one dnsmasq channel; its sidecars are removed afterwards."""
    with Broker.make(tmp_path / "broker", profiles=["dnsmasq"], image=test_image) as b:
        yield b


@pytest.fixture
def make_broker(tmp_path: Path, test_image: str) -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []

    def make(**kw: Any) -> Broker:
        kw.setdefault("image", test_image)
        b = Broker.make(tmp_path / f"broker{len(made)}", **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()
