"""Fixtures shared by the suites that drive real podman (tests/integration, tests/neutron).

Their conftest files import them by name; the root check refuses the run before any test starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.broker import REPO, TEST_IMAGE, Broker
from support.dockerd import PrivateDockerd


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


@pytest.fixture(scope="session")
def dockerd(test_image: str) -> Iterator[PrivateDockerd]:
    """One private dockerd for the session (tests/support/dockerd.py), with safespawn's OCI runtime
    registered and the test image loaded; stopped at the end. Never the machine's own daemon."""
    oci_runtime = Path(sys.executable).with_name("safespawn-oci-runtime")
    assert oci_runtime.exists(), f"{oci_runtime} is missing: pip install -e . in the venv"
    with PrivateDockerd.start(oci_runtime=str(oci_runtime)) as d:
        d.load_image(test_image)
        yield d


@pytest.fixture
def broker_runtime() -> str:
    """The runtime the `broker` and `make_broker` fixtures use. A test module overrides this fixture
    with "docker" to run the same specification through a real dockerd (tests/integration/test_docker.py)."""
    return "podman"


def _runtime_kw(request: pytest.FixtureRequest, broker_runtime: str) -> dict[str, Any]:
    return {"dockerd": request.getfixturevalue("dockerd")} if broker_runtime == "docker" else {}


@pytest.fixture
def broker(tmp_path: Path, test_image: str, request: pytest.FixtureRequest, broker_runtime: str) -> Iterator[Broker]:
    """A real broker with one dnsmasq channel; its sidecars are removed afterwards."""
    with Broker.make(tmp_path / "broker", profiles=["dnsmasq"], image=test_image,
                     **_runtime_kw(request, broker_runtime)) as b:
        yield b


@pytest.fixture
def make_broker(tmp_path: Path, test_image: str, request: pytest.FixtureRequest,
                broker_runtime: str) -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []
    runtime_kw = _runtime_kw(request, broker_runtime)

    def make(**kw: Any) -> Broker:
        kw.setdefault("image", test_image)
        for k, v in runtime_kw.items():
            kw.setdefault(k, v)
        b = Broker.make(tmp_path / f"broker{len(made)}", **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()
