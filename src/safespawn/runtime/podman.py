"""The podman CLI runtime: argv lists, `--format json`, explicit timeouts, never a socket."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..broker import budget
from ..broker.pidfiles import read_pid_file
from ..broker.sidecar import LABEL_CHANNEL, SidecarSpec
from ..errors import RuntimeFailed
from . import conmon
from .base import Container, unix_seconds
from .command import RuntimeCli

log = logging.getLogger(__name__)


def limit_args(spec: SidecarSpec, cgroup_parent: str | None) -> list[str]:
    """The sidecar's own limits, and the channel's budget cgroup it goes under (broker/budget.py).
    `--memory-swap` equal to `--memory`: swap is no way around the memory limit. Docker takes the
    same options (runtime/docker.py)."""
    argv = [
        f"--memory={spec.memory}",
        f"--memory-swap={spec.memory}",
        f"--cpus={spec.cpus:g}",
        f"--pids-limit={spec.pids_limit}",
        f"--oom-score-adj={spec.oom_score_adj}",
    ]
    if cgroup_parent:
        argv.append(f"--cgroup-parent={cgroup_parent}")
    return argv


def run_argv(spec: SidecarSpec, podman: str = "podman", pidfile: str | None = None,
             cgroup_parent: str | None = None) -> list[str]:
    """The full `podman run` command line for a spec.

    Everything before the image comes from the host: the profile, the channel config, and the
    sidecar's name/labels/netns, which the policy derived and checked. Each such value is fused
    into a single `--option=value` token, so no value can become an option of its own. The
    request's arguments only ever follow the image and the profile's command prefix.
    """
    argv = [podman, "run", "--detach", f"--name={spec.name}"]
    if pidfile is not None:
        argv.append(f"--pidfile={pidfile}")  # the host's own directory (PodmanRuntime.pid_dir)
    for k, v in sorted(spec.labels.items()):
        argv.append(f"--label={k}={v}")
    if spec.netns_path is not None:
        argv.append(f"--network=ns:{spec.netns_path}")
    else:
        argv.append("--network=none")
    argv += ["--cap-drop=ALL"] + [f"--cap-add={c}" for c in spec.capabilities]
    argv += ["--security-opt=no-new-privileges", f"--user={spec.user}"]
    if spec.pid_host:
        argv.append("--pid=host")
    if spec.read_only:
        # Without --read-only-tmpfs=false podman adds writable tmpfs mounts the profile did not ask
        # for (/var/tmp, without noexec): only the profile's own tmpfs list is writable.
        argv += ["--read-only", "--read-only-tmpfs=false"]
    for t in spec.tmpfs:
        # mode=1777: podman 4 gives a tmpfs 1777, podman 5 gives /run 755 owned by root, where a
        # sidecar running as its channel's uid cannot write its own pid file.
        argv.append(f"--tmpfs={t}:rw,nosuid,nodev,noexec,size=16m,mode=1777")
    for d in spec.mounts:
        argv.append(f"--volume={d}:{d}:rw,nosuid,nodev,noexec")
    argv += limit_args(spec, cgroup_parent)
    argv += [
        f"--restart=on-failure:{spec.restart_retries}",
        # k8s-file, named: podman's default is the host's choice (journald on Debian 13 and RHEL),
        # and journald ignores max-size, so a sidecar's stdout would grow the host's journal.
        "--log-driver=k8s-file",
        "--log-opt=max-size=1mb",
        "--stop-signal=TERM",
        f"--stop-timeout={spec.stop_grace}",
        "--entrypoint=" + json.dumps(list(spec.entrypoint)),
        "--pull=never",
        spec.image,
    ]
    return argv + list(spec.args)


def cgroup_host_of(cli: RuntimeCli) -> budget.CgroupHost:
    """Which cgroup manager and version podman uses (`podman info`: `host.cgroupManager`,
    `host.cgroupVersion`)."""
    info = cli.json(["info", "--format=json"])
    host = (info.get("host") if isinstance(info, dict) else None) or {}
    manager = str(host.get("cgroupManager") or "")
    version = str(host.get("cgroupVersion") or "")
    if manager not in ("cgroupfs", "systemd") or version not in ("v1", "v2"):
        raise RuntimeFailed(f"podman info names no cgroup manager/version: {manager[:20]!r} {version[:20]!r}")
    return budget.CgroupHost(manager, int(version[1]))


class PodmanRuntime:
    """`pid_dir`: the broker's state dir, in whose channel dirs `podman run --pidfile` leaves the
    new container's host pid, so that a start can be checked through /proc without a `podman
    inspect` (act.Verifier); None: no pid files, every start is inspected."""

    def __init__(self, podman: str = "podman", timeout: int = 60, pid_dir: str | None = None,
                 budgets: Mapping[str, budget.ChannelBudget] | None = None,
                 cgroup_host: budget.CgroupHost | None = None) -> None:
        # Without $INVOCATION_ID, so that podman gives each conmon a cgroup of its own even when the
        # broker runs as a systemd service (runtime/conmon.py).
        self.cli = RuntimeCli("podman", podman, timeout, conmon.podman_env())
        self.pid_dir = pid_dir
        # channel -> its budget: each start first makes the channel's parent cgroup hold it.
        self.budgets = dict(budgets or {})
        self._cgroup_host = cgroup_host
        self._pids: dict[str, int] = {}
        self._ready: set[str] = set()
        self._cgroup_mounts: dict[str, str] | None = None

    def list(self, channel: str | None = None) -> list[Container]:
        flt = f"label={LABEL_CHANNEL}={channel}" if channel else f"label={LABEL_CHANNEL}"
        out = self.cli.output(["ps", "--all", "--no-trunc", "--format=json", f"--filter={flt}"])
        try:
            rows: list[dict[str, Any]] = json.loads(out or "[]")
        except ValueError as e:
            raise RuntimeFailed(f"podman ps printed invalid JSON: {e}") from None
        result = []
        for r in rows:
            names = r.get("Names") or [""]
            result.append(Container(
                id=str(r.get("Id", "")),
                name=str(names[0]),
                state=str(r.get("State", "")).lower(),
                pid=int(r.get("Pid") or 0),
                labels=dict(r.get("Labels") or {}),
                started=int(r.get("StartedAt") or 0),
                exit_code=int(r.get("ExitCode") or 0),
                exited_at=max(0, int(r.get("ExitedAt") or 0)),  # never exited: year 1 (negative)
                image=str(r.get("Image") or ""),
            ))
        return result

    def inspect(self, names: Sequence[str]) -> dict[str, Container]:
        if not names:
            return {}
        # A missing name makes podman exit non-zero but still print the others.
        out = self.cli.call(["container", "inspect", "--format=json", "--", *names], check=False).stdout
        try:
            rows: list[dict[str, Any]] = json.loads(out or "[]")
        except ValueError as e:
            raise RuntimeFailed(f"podman inspect printed invalid JSON: {e}") from None
        result = {}
        for r in rows:
            st = r.get("State") or {}
            name = str(r.get("Name", "")).lstrip("/")
            result[name] = Container(
                id=str(r.get("Id", "")),
                name=name,
                state=str(st.get("Status", "")).lower(),
                pid=int(st.get("Pid") or 0),
                labels=dict((r.get("Config") or {}).get("Labels") or {}),
                exit_code=int(st.get("ExitCode") or 0),
                exited_at=unix_seconds(st.get("FinishedAt")),
                restarts=int(r.get("RestartCount") or 0),
                started=unix_seconds(st.get("StartedAt")),
            )
        return result

    def run(self, spec: SidecarSpec) -> str:
        self._pids.pop(spec.name, None)
        pidfile = self._pidfile(spec)
        parent = self.cgroup_parent(spec.channel)
        cid = self.cli.output(run_argv(spec, self.cli.argv0, pidfile, parent)[1:]).strip()
        self._release_conmon()
        if pidfile is not None and self.pid_dir is not None:
            # Walked to from the state dir without following a link; a plain, singly linked file.
            self._pids[spec.name] = read_pid_file(pidfile, [self.pid_dir]) or 0
        return cid

    def _release_conmon(self) -> None:
        """cgroup v1 with podman's cgroupfs manager: podman leaves conmon in our cgroup in the
        hierarchies systemd tracks units with; move it on to where podman put it in the others."""
        if self._cgroup_mounts is None:
            self._cgroup_mounts = conmon.tracking_mounts()
        if conmon.release(self._cgroup_mounts):
            log.debug("moved conmon out of this process's cgroup")

    @property
    def cgroup_host(self) -> budget.CgroupHost:
        if self._cgroup_host is None:
            self._cgroup_host = budget.cached_detect(self.cli.argv0, self.pid_dir, lambda: cgroup_host_of(self.cli))
        return self._cgroup_host

    def cgroup_parent(self, channel: str) -> str | None:
        """The channel's budget cgroup, made to hold its budget now; None for a channel without one
        (a runtime made without budgets: tools that only list). Raises RuntimeFailed rather than
        start a sidecar outside its channel's budget."""
        b = self.budgets.get(channel)
        if b is None:
            return None
        return budget.ensure(self.cgroup_host, channel, b)

    def run_pid(self, name: str) -> int:
        return self._pids.pop(name, 0)

    def _pidfile(self, spec: SidecarSpec) -> str | None:
        """Where `podman run` writes the new container's pid: `pids/NAME.pid` in the channel's
        state dir, a root-only directory the host created itself (never one an agent can reach);
        None when that cannot be had. podman rewrites the file at each restart of the container
        (its restart policy), so it stays until the container is removed (`remove`)."""
        channel = spec.labels.get(LABEL_CHANNEL, "")
        if self.pid_dir is None or not channel or "/" in channel or channel.startswith("."):
            return None
        where = os.path.join(self.pid_dir, channel, "pids")
        if where not in self._ready:
            try:
                os.makedirs(where, mode=0o700, exist_ok=True)
                st = os.lstat(where)
            except OSError as e:
                log.warning("no pid files for podman run (%s): starts are checked with podman inspect", e)
                return None
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                log.warning("%s is not a private directory of ours: starts are checked with podman inspect", where)
                return None
            self._ready.add(where)
        path = os.path.join(where, spec.name + ".pid")
        try:
            os.unlink(path)  # never read a pid an earlier run left
        except FileNotFoundError:
            pass
        except OSError:
            return None
        return path

    def _forget_pidfile(self, name: str) -> None:
        if self.pid_dir is None:
            return
        try:
            channels = os.listdir(self.pid_dir)
        except OSError:
            return
        for channel in channels:
            try:
                os.unlink(os.path.join(self.pid_dir, channel, "pids", name + ".pid"))
            except OSError:
                pass

    def signal(self, name: str, signal: str) -> None:
        self.cli.output(["kill", f"--signal={signal}", "--", name])

    def stop(self, name: str, grace: int) -> None:
        self.cli.output(["stop", f"--time={grace}", "--ignore", "--", name], timeout=grace + self.cli.timeout)
        self.remove(name)

    def remove(self, name: str) -> None:
        self._forget_pidfile(name)
        try:
            self.cli.output(["rm", "--force", "--ignore", "--time=0", "--", name])
        except RuntimeFailed as e:
            # Seen under load: a container that podman's restart policy is restarting stops
            # between rm's check and its kill ("container state improper: stopped"); a second
            # rm finds it stopped and removes it.
            if "state improper" not in e.message:
                raise
            time.sleep(0.2)
            self.cli.output(["rm", "--force", "--ignore", "--time=0", "--", name])

    def logs(self, name: str, lines: int = 20) -> str:
        try:
            p = self.cli.call(["logs", f"--tail={lines}", "--", name], check=False)
        except RuntimeFailed:
            return ""
        return (p.stdout + p.stderr).strip()
