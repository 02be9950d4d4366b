#!/usr/bin/env python3
"""The wrapper-mode client's own cost: its imports, a whole kill-script process, and how soon it
sees its reply. No broker and no podman: a responder thread in this process answers each request
the moment it appears (inotify on inbox/new), so what is left is the client's share of a request.

    .venv/bin/python benchmarks/client_cost.py [--n 200] [--ref main]

Measured with the agent image's kind of interpreter, /usr/bin/python3 (not a pyenv shim), and with
no bytecode cache for the client (the wrapper directory is mounted read-only into the agent, so
`safespawn_client.py` is compiled by every process):
- import: `import safespawn_client` in a fresh interpreter (`-X importtime`, cumulative), p50;
- process: `/usr/bin/python3 DIR/dnsmasq-kill HUP 1`, start to exit, p50/p95, beside
  `/usr/bin/python3 -c pass` (the interpreter alone);
- pick-up: in one process, `client.submit` against a responder that replies at once (p50/p95),
  and one that replies 50-150 ms later, uniformly (the mean latency minus 100 ms): what the
  client's wait adds.
With `--ref REF` the same is measured for the client of that git revision (e.g. `main`), in the
same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import pct  # noqa: E402

from safespawn.broker.inbox import create_channel_dirs  # noqa: E402
from safespawn.broker.watch import Inotify  # noqa: E402

PY = "/usr/bin/python3"


class Responder:
    """Answers every request in CHANNEL/inbox/new with ok, `delay` seconds after it appears."""

    def __init__(self, channel: Path, delay: float = 0.0) -> None:
        self.channel, self.delay = channel, delay
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        new = self.channel / "inbox" / "new"
        notify = Inotify()
        notify.add(str(new))
        try:
            while not self.stop.is_set():
                for name in os.listdir(new):
                    if self.delay:
                        # Uniform in [delay/2, 3 delay/2]: a fixed delay would meet the poll's
                        # schedule at the same phase every time.
                        time.sleep(self.delay * random.uniform(0.5, 1.5))
                    rid = name.removesuffix(".json")
                    tmp = self.channel / "outbox" / f".{rid}.tmp"
                    tmp.write_text(f'{{"v":1,"id":"{rid}","ok":true,"sidecar":"x","pid":1,"error":null}}')
                    os.rename(tmp, self.channel / "outbox" / "replies" / f"{rid}.json")
                    os.unlink(new / name)
                notify.wait(0.2)
        finally:
            notify.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def client_dir(root: Path, name: str, source: str, channel: Path) -> Path:
    d = root / name
    d.mkdir()
    (d / "safespawn_client.py").write_text(source)
    (d / "dnsmasq-kill").write_text(f"#!{PY}\nimport os\nimport sys\n"
                                    "sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))\n"
                                    "import safespawn_client as client\n"
                                    f"sys.exit(client.kill_main('dnsmasq', {str(channel)!r}))\n")
    (d / "dnsmasq-kill").chmod(0o755)
    return d


def import_cost(d: Path, n: int) -> float:
    out = []
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for _ in range(n):
        p = subprocess.run([PY, "-X", "importtime", "-c", f"import sys; sys.path.insert(0, {str(d)!r}); "
                            "import safespawn_client"], capture_output=True, text=True, env=env, check=True)
        line = [x for x in p.stderr.splitlines() if x.rstrip().endswith("| safespawn_client")][0]
        out.append(int(line.split("|")[1]) / 1e6)
    return statistics.median(out)


def process_cost(argv: list[str], n: int) -> list[float]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        out.append(time.monotonic() - t0)
    return out


def load(d: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"client_{d.name}", d / "safespawn_client.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pickup(mod: ModuleType, channel: Path, n: int, delay: float) -> list[float]:
    """Request-to-reply latencies; with `delay`, the responder's own wait is in the latency (its
    mean is `delay`)."""
    r = Responder(channel, delay)
    out = []
    try:
        for _ in range(n):
            t0 = time.monotonic()
            reply = mod.submit(str(channel), mod.signal_request("HUP", pid=1, profile="dnsmasq"), timeout=10)
            out.append(time.monotonic() - t0)
            assert reply["ok"]
    finally:
        r.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ref", help="also measure the client of this git revision, e.g. main")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-client-"))
    channel = root / "channel"
    create_channel_dirs(str(channel), os.getuid(), os.getgid())
    sources = {"this tree": (REPO / "src" / "safespawn" / "agent" / "client.py").read_text()}
    if args.ref:
        # The client moved to agent/ with the layout by side of the trust boundary; older revisions have it on top.
        for path in ("src/safespawn/agent/client.py", "src/safespawn/client.py"):
            shown = subprocess.run(["git", "-C", str(REPO), "show", f"{args.ref}:{path}"], capture_output=True,
                                   text=True)
            if shown.returncode == 0:
                sources[args.ref] = shown.stdout
                break
        else:
            raise SystemExit(f"{args.ref} has no safespawn client")
    load_before = os.getloadavg()
    interp = process_cost([PY, "-c", "pass"], args.n)
    rows = []
    for i, (what, source) in enumerate(sources.items()):
        d = client_dir(root, f"c{i}", source, channel)
        imp = import_cost(d, max(20, args.n // 5))
        responder = Responder(channel)
        try:
            proc = process_cost([str(d / "dnsmasq-kill"), "HUP", "1"], args.n)
        finally:
            responder.close()
        mod = load(d)
        fast = pickup(mod, channel, args.n, 0.0)
        start_like = pickup(mod, channel, max(40, args.n // 2), 0.1)
        rows.append((what, imp, proc, fast, start_like))
    print(f"\n## The wrapper-mode client ({PY}, no bytecode cache; n = {args.n})\n")
    print(f"| measure | {' | '.join(r[0] for r in rows)} |\n|---|{'---|' * len(rows)}")
    print(f"| `import safespawn_client`, p50 | {' | '.join(f'{r[1] * 1000:.1f} ms' for r in rows)} |")
    print("| kill-script process, start to exit (reply at once), p50 / p95 | "
          + " | ".join(f"{pct(r[2], 50) * 1000:.1f} / {pct(r[2], 95) * 1000:.1f} ms" for r in rows) + " |")
    print(f"| for scale: `{PY} -c pass`, p50 / p95 | "
          + " | ".join(f"{pct(interp, 50) * 1000:.1f} / {pct(interp, 95) * 1000:.1f} ms" for _ in rows) + " |")
    print("| reply seen after it is written (in-process submit, reply at once), p50 / p95 | "
          + " | ".join(f"{pct(r[3], 50) * 1000:.2f} / {pct(r[3], 95) * 1000:.2f} ms" for r in rows) + " |")
    print("| same, reply written 50-150 ms after the request (a start): mean latency - 100 ms | "
          + " | ".join(f"{(statistics.mean(r[4]) - 0.1) * 1000:.2f} ms" for r in rows) + " |")
    print(f"\nload average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
