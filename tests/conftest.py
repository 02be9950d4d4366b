"""Top-level test configuration: importable helpers (tests/support) and the integration marker.

Nothing here needs root: `pytest tests/unit` runs as any user. The root check and the fixtures that
drive real podman live in tests/integration/conftest.py and tests/neutron/conftest.py.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# tests/vm runs inside the VM (scripts/vm test, tests/vm/README.md), never in the host's pytest.
collect_ignore = ["vm"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath) or "/neutron/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
