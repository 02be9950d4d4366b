"""Helpers the benchmarks share: percentiles, removing containers by label, timing podman alone.

Importing it puts tests/ on sys.path, so that a benchmark can use the test support (a real broker,
a real systemd manager) the way the integration tests do.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def podman_rm(label: str) -> None:
    """Remove every container that carries `label` (KEY=VALUE)."""
    ids = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True,
                         timeout=120, check=False).stdout.split()
    if ids:
        subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, timeout=600, check=False)


def podman_baseline(argvs: list[list[str]], parallel: int) -> float:
    """Seconds to run these command lines (`podman run -d ...`), `parallel` at a time."""
    t0 = time.monotonic()

    def run(argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(run, argvs))
    return time.monotonic() - t0
