"""The Docker CLI runtime: argv lists, JSON output, explicit timeouts, the daemon named by DOCKER_HOST.

A peer of podman.py with the same guarantees. Two things differ, both because of Docker itself:
- Docker cannot join a named netns. Every sidecar is created `--network=none` with the OCI runtime
  safespawn registers with dockerd (`--runtime=safespawn`, ociruntime.py), and names its netns in the
  container's environment; that program checks it again and puts the container's init into it.
  If the runtime were missing, `docker run` fails; if the variable were lost, the sidecar stays in a
  fresh empty netns: never the host's.
- `docker run -v` has no nosuid/nodev/noexec: the same OCI runtime adds them to every bind mount.
`docker ps` has no pids or label maps, so a listing is one `docker ps -q` plus one `docker inspect`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..broker import budget
from ..broker.sidecar import LABEL_CHANNEL, SidecarSpec
from ..errors import RuntimeFailed
from .base import Container, unix_seconds
from .command import RuntimeCli, docker_env
from .ociruntime import ENV_NETNS, ENV_PROFILE
from .podman import limit_args

log = logging.getLogger(__name__)
DEFAULT_OCI_RUNTIME = "safespawn"


def run_argv(spec: SidecarSpec, docker: str = "docker", oci_runtime: str = DEFAULT_OCI_RUNTIME,
             cgroup_parent: str | None = None) -> list[str]:
    """The full `docker run` command line for a spec.

    As for podman: every host-side value is fused into one `--option=value` token and the request's
    arguments only follow the image. Docker's --entrypoint is one program, so the rest of the
    profile's fixed command prefix comes right after the image, before the request's arguments.
    """
    argv = [docker, "run", "--detach", f"--name={spec.name}", f"--runtime={oci_runtime}"]
    for k, v in sorted(spec.labels.items()):
        argv.append(f"--label={k}={v}")
    argv.append("--network=none")
    if spec.netns_path is not None:
        # Read by the OCI runtime, which checks the name again before the container joins it.
        argv += [f"--env={ENV_NETNS}={spec.netns}", f"--env={ENV_PROFILE}={spec.profile}"]
    argv += ["--cap-drop=ALL"] + [f"--cap-add={c}" for c in spec.capabilities]
    argv += ["--security-opt=no-new-privileges", f"--user={spec.user}"]
    # Docker's default on cgroup v1 hosts is the host's cgroup namespace; podman's is private.
    argv.append("--cgroupns=private")
    if spec.pid_host:
        argv.append("--pid=host")
    if spec.read_only:
        argv.append("--read-only")
    for t in spec.tmpfs:
        argv.append(f"--tmpfs={t}:rw,nosuid,nodev,noexec,size=16m,mode=1777")  # as podman is told
    for d in spec.mounts:
        # nosuid,nodev,noexec: added by the OCI runtime (docker -v cannot say it).
        argv.append(f"--mount=type=bind,source={d},target={d}")
    # The same limits as with podman (memory with swap, CPUs, pids, OOM preference) and the
    # channel's budget cgroup: dockerd takes --cgroup-parent as a path (cgroupfs driver) or a slice
    # (systemd driver), as podman does.
    argv += limit_args(spec, cgroup_parent)
    argv += [
        f"--restart=on-failure:{spec.restart_retries}",
        "--log-driver=json-file",
        "--log-opt=max-size=1m",
        "--stop-signal=TERM",
        f"--stop-timeout={spec.stop_grace}",
        f"--entrypoint={spec.entrypoint[0]}",
        "--pull=never",
        spec.image,
    ]
    return argv + list(spec.entrypoint[1:]) + list(spec.args)


def _container(r: dict[str, Any]) -> Container:
    st = r.get("State") or {}
    return Container(
        id=str(r.get("Id", "")),
        name=str(r.get("Name", "")).lstrip("/"),
        state=str(st.get("Status", "")).lower(),
        pid=int(st.get("Pid") or 0),
        labels=dict((r.get("Config") or {}).get("Labels") or {}),
        started=unix_seconds(st.get("StartedAt")),
        exit_code=int(st.get("ExitCode") or 0),
        exited_at=unix_seconds(st.get("FinishedAt")),
        restarts=int(r.get("RestartCount") or 0),
        image=str((r.get("Config") or {}).get("Image") or ""),
    )


class DockerRuntime:
    def __init__(self, docker: str = "docker", docker_host: str = "", oci_runtime: str = DEFAULT_OCI_RUNTIME,
                 timeout: int = 60, budgets: Mapping[str, budget.ChannelBudget] | None = None) -> None:
        self.cli = RuntimeCli("docker", docker, timeout, docker_env(docker_host))
        self.budgets = dict(budgets or {})
        self._cgroup_host: budget.CgroupHost | None = None
        self.oci_runtime = oci_runtime

    def _inspect_rows(self, refs: Sequence[str]) -> list[dict[str, Any]]:
        if not refs:
            return []
        # A missing name makes docker exit 1 but still print the others.
        p = self.cli.call(["container", "inspect", "--format={{json .}}", "--", *refs], check=False)
        rows = []
        for line in p.stdout.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise RuntimeFailed(f"docker inspect printed invalid JSON: {e}") from None
            if isinstance(row, dict):
                rows.append(row)
        if p.returncode != 0 and not rows and "No such" not in p.stderr:
            raise RuntimeFailed(f"docker inspect failed (rc {p.returncode}): {p.stderr.strip()[-300:]}")
        return rows

    def list(self, channel: str | None = None) -> list[Container]:
        flt = f"label={LABEL_CHANNEL}={channel}" if channel else f"label={LABEL_CHANNEL}"
        ids = self.cli.output(["ps", "--all", "--quiet", "--no-trunc", f"--filter={flt}"]).split()
        # A container removed between the two calls is simply not listed.
        return [_container(r) for r in self._inspect_rows(ids)]

    def inspect(self, names: Sequence[str]) -> dict[str, Container]:
        return {c.name: c for c in map(_container, self._inspect_rows(names))}

    def run(self, spec: SidecarSpec) -> str:
        parent = self.cgroup_parent(spec.channel)
        return self.cli.output(run_argv(spec, self.cli.argv0, self.oci_runtime, parent)[1:]).strip()

    @property
    def cgroup_host(self) -> budget.CgroupHost:
        """dockerd's cgroup driver and version (`docker info`), asked once."""
        if self._cgroup_host is None:
            out = self.cli.output(["info", "--format={{json .CgroupDriver}} {{json .CgroupVersion}}"]).split()
            driver, version = (json.loads(v) for v in out[:2]) if len(out) >= 2 else ("", "")
            if driver not in ("cgroupfs", "systemd") or str(version) not in ("1", "2"):
                raise RuntimeFailed(f"docker info names no cgroup driver/version: {out[:2]}")
            self._cgroup_host = budget.CgroupHost(str(driver), int(version))
        return self._cgroup_host

    def cgroup_parent(self, channel: str) -> str | None:
        """As PodmanRuntime.cgroup_parent: the channel's budget cgroup, holding its budget now."""
        b = self.budgets.get(channel)
        if b is None:
            return None
        return budget.ensure(self.cgroup_host, channel, b)

    def run_pid(self, name: str) -> int:
        return 0  # `docker run` writes no pid file: the start is checked with `docker inspect`

    def signal(self, name: str, signal: str) -> None:
        self.cli.output(["kill", f"--signal={signal}", "--", name])

    def stop(self, name: str, grace: int) -> None:
        p = self.cli.call(["stop", f"--time={grace}", "--", name], timeout=grace + self.cli.timeout, check=False)
        if p.returncode != 0 and "No such container" not in p.stderr:
            raise RuntimeFailed(f"docker stop failed (rc {p.returncode}): {p.stderr.strip()[-300:]}")
        self.remove(name)

    def remove(self, name: str) -> None:
        p = self.cli.call(["rm", "--force", "--", name], check=False)
        if p.returncode != 0 and "No such container" not in p.stderr:
            raise RuntimeFailed(f"docker rm failed (rc {p.returncode}): {p.stderr.strip()[-300:]}")

    def logs(self, name: str, lines: int = 20) -> str:
        try:
            p = self.cli.call(["logs", f"--tail={lines}", "--", name], check=False)
        except RuntimeFailed:
            return ""
        return (p.stdout + p.stderr).strip()

    # -- checks for check-config and doctor ----------------------------------------------------

    def check_daemon(self) -> str | None:
        """None if the daemon answers and has the OCI runtime registered, else what is wrong."""
        try:
            out = self.cli.output(["info", "--format={{json .Runtimes}}"])
        except RuntimeFailed as e:
            return e.message
        try:
            runtimes = json.loads(out or "{}")
        except ValueError:
            return f"docker info printed invalid JSON: {out[:200]!r}"
        if not isinstance(runtimes, dict) or self.oci_runtime not in runtimes:
            return (f"dockerd has no OCI runtime {self.oci_runtime!r} (registered: "
                    f"{', '.join(sorted(runtimes)) if isinstance(runtimes, dict) else '?'})")
        return None

    def image_exists(self, image: str) -> bool:
        try:
            return self.cli.call(["image", "inspect", "--format={{.Id}}", "--", image], check=False).returncode == 0
        except RuntimeFailed:
            return False

    def probe_netns(self, image: str, netns_dir: str, netns: str, profile: str, name: str) -> str | None:
        """Start a throw-away container in `netns` as a sidecar would; None if it landed there.

        Shows the whole netns-joining path works: dockerd knows the OCI runtime, the runtime accepts
        the value, and the container's init ends up in that very namespace.
        """
        netns_path = os.path.join(netns_dir, netns)
        argv = ["run", "--detach", f"--name={name}", f"--runtime={self.oci_runtime}", "--network=none",
                f"--env={ENV_NETNS}={netns}", f"--env={ENV_PROFILE}={profile}", "--cap-drop=ALL",
                "--security-opt=no-new-privileges", "--read-only", "--pull=never", "--entrypoint=sleep",
                image, "30"]
        try:
            self.cli.output(argv)
            c = self.inspect([name]).get(name)
            if c is None or not c.running:
                return "the probe container did not run"
            want, got = os.stat(netns_path), os.stat(f"/proc/{c.pid}/ns/net")
            if (want.st_dev, want.st_ino) != (got.st_dev, got.st_ino):
                return f"the probe container is not in {netns_path}"
            return None
        except (RuntimeFailed, OSError) as e:
            return str(e)
        finally:
            try:
                self.remove(name)
            except RuntimeFailed:
                pass
