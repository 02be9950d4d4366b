"""A private dockerd for tests: its own data root, exec root, socket and pid file, never the machine's.

    with PrivateDockerd.start(oci_runtime=".venv/bin/safespawn-oci-runtime") as d:
        d.docker("ps")                      # the CLI pointed at this daemon only (DOCKER_HOST)
        d.load_image("localhost/safespawn-test:latest")   # podman save | docker load

The daemon runs without iptables, ip6tables or a bridge (docs/testbed.md), with safespawn's OCI runtime
registered as `safespawn` in its own daemon.json (`--config-file`). It is stopped by its own pid at the end and its folders are removed; a
Docker daemon that was already running on the machine is never contacted (the default socket is
never used: every CLI call carries DOCKER_HOST).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOCKERD = os.environ.get("SAFESPAWN_TEST_DOCKERD", "/usr/sbin/dockerd")
# Debian's CLI, which matches Debian's dockerd; another CLI may sit first on PATH (/usr/local/bin).
DOCKER = os.environ.get("SAFESPAWN_TEST_DOCKER", "/usr/bin/docker")


@dataclass
class PrivateDockerd:
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, DOCKER_HOST=self.host)

    @classmethod
    def start(cls, oci_runtime: str, timeout: float = 60) -> PrivateDockerd:
        # Short paths: containerd's sockets live under the exec root (108-byte socket path limit).
        root = Path(tempfile.mkdtemp(prefix="ssd-", dir="/tmp"))
        argv = [DOCKERD, "--iptables=false", "--ip6tables=false", "--bridge=none",
                f"--data-root={root}/data", f"--exec-root={root}/exec", f"-H=unix://{root}/docker.sock",
                f"--pidfile={root}/pid", f"--config-file={root}/daemon.json"]
        # In daemon.json, not --add-runtime: dockerd forgets a flag's runtime when it reloads its
        # config file on SIGHUP (seen when the Ansible role's handler reloads this daemon).
        (root / "daemon.json").write_text(json.dumps({"runtimes": {"safespawn": {"path": oci_runtime}}}) + "\n")
        # The OCI runtime reads the broker's netns and profile folders from the safespawn config
        # named in its own environment (dockerd's, inherited through containerd and its shim).
        (root / "safespawn.toml").write_text('[broker]\nnetns_dir = "/run/netns"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "SAFESPAWN_"))}
        env["SAFESPAWN_CONFIG"] = str(root / "safespawn.toml")
        log = open(root / "dockerd.log", "wb")  # noqa: SIM115 (kept open for the daemon's life)
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env)
        d = cls(root, proc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({proc.returncode}): {d.log_tail()}")
            if d.docker("version", "--format={{.Server.Version}}", check=False, timeout=10).returncode == 0:
                return d
            if time.monotonic() > deadline:
                d.stop()
                raise RuntimeError(f"dockerd not ready after {timeout}s: {d.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                           check=False, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def load_image(self, image: str) -> None:
        save = subprocess.Popen(["podman", "save", image], stdout=subprocess.PIPE)
        try:
            load = subprocess.run([DOCKER, "load"], stdin=save.stdout, capture_output=True, text=True,
                                  timeout=300, env=self.env, check=False)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save.wait(timeout=300)
        if load.returncode != 0 or save.returncode != 0:
            raise RuntimeError(f"podman save {image} | docker load failed: {load.stderr.strip()}")

    def inspect(self, *refs: str) -> list[dict[str, Any]]:
        if not refs:
            return []
        out = self.docker("container", "inspect", "--", *refs, check=False).stdout
        return json.loads(out or "[]")

    def ps(self, label: str) -> list[dict[str, Any]]:
        """Containers with `label`, in podman's `ps --format json` shape (Id, Names, State, Pid, Labels)."""
        ids = self.docker("ps", "-a", "-q", "--no-trunc", f"--filter=label={label}").stdout.split()
        return [{"Id": r["Id"], "Names": [r["Name"].lstrip("/")], "State": r["State"]["Status"],
                 "Pid": r["State"]["Pid"], "Labels": r["Config"]["Labels"] or {}} for r in self.inspect(*ids)]

    def rm_by_label(self, label: str) -> None:
        ids = self.docker("ps", "-a", "-q", "--no-trunc", f"--filter=label={label}", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            ids = self.docker("ps", "-a", "-q", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # dockerd leaves exec/netns/default (a bind mount of its own netns) behind even on a clean
        # stop, and overlay mounts if it crashed: unmount what is under our root, deepest first.
        for point in sorted(self._mounts(), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        if not self._mounts():  # never delete through a mount that is still there
            shutil.rmtree(self.root, ignore_errors=True)

    def _mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4] for ln in f]
        return [p for p in points if p.startswith(f"{self.root}/")]

    def __enter__(self) -> PrivateDockerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
