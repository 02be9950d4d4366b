"""`safespawn adopt`: take over the sidecars today's wrappers started, one network at a time.

The shapes recognised (the wrappers' own, see docs/operations.md):
    tripleo  `nsenter --net=/run/netns/NS ... podman run --detach --net host --pid host --privileged
             --name neutron-PROC-NS[-TIMESTAMP] IMAGE PROGRAM ARGS`  (a name collision adds -TIMESTAMP)
    kolla    `<agent container>_PROC_NS`, `--rm --privileged --pid host`, often with `ip netns exec NS`
             before the program

The name only nominates a container. What is adopted is read from the container itself: the
program and its arguments from the command line of its running process (/proc/PID/cmdline, the
container's command line from `podman/docker inspect` when that is not readable), and the netns from the
inode of /proc/PID/ns/net compared with every /run/netns entry. A container whose real netns is not
the one its name says, or that is in no named netns, is refused.

For each network (profile + netns), under a host-private journal (state_dir/CH/adopt.json):
    1. policy: the request the confined sidecar will be started with goes through the same gate as
       an agent's (Policy.authorize_start); a refusal is reported and the legacy sidecars are left
       running, untouched;
    2. journal "switching" (durable) with the request and every legacy container of the network;
    3. stop the legacy containers (all twins): both dnsmasq cannot bind the same netns at once, so
       the old one goes first and the outage is stop + start;
    4. write the start request into the channel's inbox and run the engine's normal sync on it, so
       the ledger, desired state, audit log, pid files and post-start checks all apply;
    5. on success remove the legacy containers and journal "done"; on failure start the legacy ones
       again (a --rm container is gone and cannot be), journal "failed" and stop.
Killed at any point, a re-run finishes the networks the journal holds as "switching" first, so no
network is left without its sidecar and none keeps two.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..agent import client
from ..broker.files import atomic_write, open_dir, write_all
from ..broker.policy import Policy
from ..broker.request import Request
from ..broker.sidecar import LABEL_CHANNEL
from ..config import ChannelConfig, Config
from ..errors import RuntimeFailed, SafespawnError
from ..runtime.command import RuntimeCli

log = logging.getLogger(__name__)

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
NETNS_NAME = rf"[a-z][a-z0-9]*-{UUID}"
TRIPLEO_RE = re.compile(rf"neutron-(?P<proc>[a-z][a-z-]*?)-(?P<ns>{NETNS_NAME})(?:-(?P<ts>[0-9]{{6,}}))?")
KOLLA_RE = re.compile(rf"(?P<agent>[A-Za-z0-9][A-Za-z0-9_.-]*)_(?P<proc>[a-z][a-z-]*)_(?P<ns>{NETNS_NAME})")
# What may come before the program on a legacy command line: an init, `ip netns exec NS`, `env K=V`.
INITS = frozenset({"dumb-init", "tini", "catatonit", "tini-static"})
JOURNAL = "adopt.json"
STOP_GRACE = 5


@dataclass(frozen=True)
class Legacy:
    """One legacy sidecar container, as read from the runtime (podman or docker) and /proc."""

    name: str
    id: str
    flavor: str  # tripleo | kolla
    proc: str  # from the name
    name_netns: str  # the netns the name says
    running: bool
    pid: int
    created: float
    cmdline: tuple[str, ...]  # the running process's, else the container's
    netns: str | None  # the named netns its process is really in; None: none / not running
    auto_remove: bool


@dataclass
class Network:
    """The plan for one (profile, netns): which container's command line wins, and all twins."""

    profile: str
    netns: str
    argv: tuple[str, ...] = ()
    legacy: list[str] = field(default_factory=list)
    source: str = ""
    refused: str = ""  # why this network is left alone
    state: str = "planned"  # planned | switching | done | failed | refused
    outage: float | None = None
    sidecar: str = ""
    pid: int | None = None
    error: str = ""


# -- reading the legacy containers --------------------------------------------------------------------

class Cli(RuntimeCli):
    """The configured runtime's CLI (podman or docker, with DOCKER_HOST from the config), as adopt uses it.

    One code path for both: only the commands and flags the two CLIs share are used, and their JSON
    differences are handled in `rows` (docker ps has no JSON list, so ids + one inspect, as
    runtime/docker.py lists; docker prints "/name", podman "name"). Every call goes through
    RuntimeCli.call, as the runtimes' own.
    """

    @classmethod
    def from_config(cls, config: Config) -> Cli:
        c = RuntimeCli.configured(config.broker)
        return cls(c.kind, c.argv0, c.timeout, c.env)

    def rows(self) -> list[dict[str, Any]]:
        """`container inspect` of every container, with Name without docker's leading "/"."""
        ids = self.call(["ps", "--all", "--quiet", "--no-trunc"]).stdout.split()
        if not ids:
            return []
        # Both print a JSON array by default; a container removed in between is just not listed.
        out = self.call(["container", "inspect", "--", *ids], check=False).stdout
        try:
            rows = json.loads(out or "[]")
        except ValueError as e:
            raise RuntimeFailed(f"{self.kind} inspect printed invalid JSON: {e}") from None
        if not isinstance(rows, list):
            raise RuntimeFailed(f"{self.kind} inspect printed no list")
        return [{**r, "Name": str(r.get("Name", "")).lstrip("/")} for r in rows if isinstance(r, dict)]

    def stop(self, name: str, grace: int) -> None:
        self.call(["stop", f"--time={grace}", "--", name], timeout=grace + self.timeout, check=False)

    def remove(self, name: str) -> None:
        self.call(["rm", "--force", "--", name], check=False)

    def start(self, name: str) -> bool:
        return self.call(["start", "--", name], check=False).returncode == 0


def named_netns_by_inode(netns_dir: str) -> dict[tuple[int, int], str]:
    """(dev, ino) of every named netns, the way `ip netns identify` finds a process's name."""
    out: dict[tuple[int, int], str] = {}
    try:
        names = os.listdir(netns_dir)
    except FileNotFoundError:
        return out
    for n in names:
        p = os.path.join(netns_dir, n)
        try:
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue  # a symlink or anything else is not a netns mount
            st = os.stat(p)
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = n
    return out


def _proc_cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return tuple(p.decode("utf-8", "surrogateescape") for p in parts) or None


def _proc_netns(pid: int, by_inode: dict[tuple[int, int], str]) -> str | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return by_inode.get((st.st_dev, st.st_ino))


def discover(cli: Cli, netns_dir: str, flavor: str = "auto") -> list[Legacy]:
    """Every container whose name has a legacy wrapper's shape, read from the container itself."""
    info = [r for r in cli.rows() if _match(r["Name"], flavor) is not None]
    by_inode = named_netns_by_inode(netns_dir)
    found = []
    for r in info:
        name = r["Name"]
        m = _match(name, flavor)
        if m is None:
            continue
        kind, g = m
        labels = (r.get("Config") or {}).get("Labels") or {}
        if LABEL_CHANNEL in labels:
            continue  # one of ours (a name can collide only by accident)
        st = r.get("State") or {}
        running = str(st.get("Status", "")).lower() == "running" and int(st.get("Pid") or 0) > 0
        pid = int(st.get("Pid") or 0) if running else 0
        cmd = _proc_cmdline(pid) if running else None
        if cmd is None:
            cmd = tuple([str(r.get("Path", ""))] + [str(a) for a in (r.get("Args") or [])])
        created = r.get("Created", "")
        found.append(Legacy(
            name=name, id=str(r.get("Id", "")), flavor=kind, proc=g["proc"], name_netns=g["ns"],
            running=running, pid=pid, created=_created(created), cmdline=cmd,
            netns=_proc_netns(pid, by_inode) if running else None,
            auto_remove=bool((r.get("HostConfig") or {}).get("AutoRemove")),
        ))
    return found


def _match(name: str, flavor: str) -> tuple[str, dict[str, str]] | None:
    if flavor in ("tripleo", "auto"):
        m = TRIPLEO_RE.fullmatch(name)
        if m:
            return "tripleo", m.groupdict()
    if flavor in ("kolla", "auto"):
        m = KOLLA_RE.fullmatch(name)
        if m:
            return "kolla", m.groupdict()
    return None


def _created(v: Any) -> float:
    # podman prints an RFC 3339 time with nanoseconds; ordering twins needs only a sortable number.
    s = str(v)
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?", s)
    if not m:
        return 0.0
    secs = calendar.timegm(tuple(int(x) for x in m.groups()[:6]) + (0, 0, 0))
    frac = float("0." + m.group(7)) if m.group(7) else 0.0
    return secs + frac


def program_argv(cmdline: Sequence[str], program: str, fixed: Sequence[str]) -> tuple[str, ...] | None:
    """The program's own arguments from a legacy command line, or None if it is not that program.

    Before the program only an init, `ip netns exec NAME` and `env K=V...` may come; the profile's
    fixed foreground flags (dnsmasq -k, ...) are dropped, since the profile adds them itself.
    """
    i = 0
    cmd = list(cmdline)
    while i < len(cmd):
        base = os.path.basename(cmd[i])
        if base == program:
            rest = cmd[i + 1:]
            return tuple(a for a in rest if a not in fixed)
        if base in INITS:
            i += 1
            while i < len(cmd) and cmd[i].startswith("-"):
                i += 1
            continue
        if base == "ip" and cmd[i + 1:i + 3] == ["netns", "exec"] and len(cmd) > i + 3:
            i += 4
            continue
        if base == "env":
            i += 1
            while i < len(cmd) and ("=" in cmd[i] or cmd[i].startswith("-")):
                i += 1
            continue
        return None
    return None


# -- the plan -------------------------------------------------------------------------------------------

def plan(config: Config, policy: Policy, channel: ChannelConfig, legacy: list[Legacy]) -> list[Network]:
    """Group the legacy containers by network and decide each network: adopt from which, or refuse."""
    groups: dict[tuple[str, str], list[Legacy]] = {}
    for lg in legacy:
        groups.setdefault((lg.proc, lg.name_netns), []).append(lg)
    nets = []
    for (proc, ns), members in sorted(groups.items()):
        net = Network(profile=proc, netns=ns, legacy=sorted(m.name for m in members))
        nets.append(net)
        if proc not in channel.profiles:
            net.refused, net.state = f"profile {proc!r} is not allowed in channel {channel.name}", "refused"
            continue
        profile = policy.profiles[proc]
        running = sorted((m for m in members if m.running), key=lambda m: (m.created, m.name), reverse=True)
        if not running:
            net.refused, net.state = "no legacy container of this network is running", "refused"
            continue
        src = running[0]  # the newest running twin carries the agent's latest command line
        net.source = src.name
        # DENY: trust the process, not the name: it must really be in the netns the name says.
        if src.netns != ns:
            net.refused = (f"{src.name} runs in netns {src.netns or '(none named)'}, not in {ns} as its name says")
            net.state = "refused"
            continue
        argv = program_argv(src.cmdline, os.path.basename(profile.command[0]), profile.command[1:])
        if argv is None:
            net.refused = f"{src.name} does not run {profile.command[0]} ({' '.join(src.cmdline)[:120]})"
            net.state = "refused"
            continue
        net.argv = argv
        try:
            # The one gate: exactly what an agent's start request would be checked with.
            policy.authorize_start(channel, Request("0" * 32, "start", proc, ns, argv))
        except SafespawnError as e:
            net.refused, net.state = e.message, "refused"
    return nets


# -- the journal ---------------------------------------------------------------------------------------

class Journal:
    """state_dir/CH/adopt.json: the networks being switched, written durably before each step."""

    def __init__(self, state_dir: str, channel: str) -> None:
        self.dir = os.path.join(state_dir, channel)
        self.networks: dict[str, Network] = {}

    def load(self) -> None:
        try:
            with open(os.path.join(self.dir, JOURNAL), "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        for d in data.get("networks", []):
            n = Network(**{**d, "argv": tuple(d.get("argv", ())), "legacy": list(d.get("legacy", []))})
            self.networks[f"{n.profile}/{n.netns}"] = n

    def save(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        dfd = open_dir(self.dir)
        try:
            data = {"v": 1, "networks": [{**asdict(n), "argv": list(n.argv)} for n in self.networks.values()]}
            atomic_write(dfd, JOURNAL, json.dumps(data, indent=1).encode(), mode=0o600)
        finally:
            os.close(dfd)


# -- doing it -------------------------------------------------------------------------------------------

@dataclass
class Adoption:
    config: Config
    channel: ChannelConfig
    engine: Any  # engine.Engine (imported late: the CLI imports this module cheaply)
    flavor: str = "auto"
    reply_timeout: float = 120.0
    networks: list[Network] = field(default_factory=list)

    @property
    def cli(self) -> Cli:
        return Cli.from_config(self.config)

    def run(self, dry_run: bool = False) -> list[Network]:
        b = self.config.broker
        journal = Journal(str(b.state_dir), self.channel.name)
        journal.load()
        legacy = discover(self.cli, str(b.netns_dir), self.flavor)
        fresh = {f"{n.profile}/{n.netns}": n for n in plan(self.config, self.engine.policy, self.channel, legacy)}
        # Networks a killed run left half switched come first, with the request it journaled.
        order: list[Network] = []
        for key, n in journal.networks.items():
            if n.state in ("switching", "failed"):
                extra = fresh.pop(key, None)
                if extra is not None:
                    n.legacy = sorted(set(n.legacy) | set(extra.legacy))
                order.append(n)
        order += [n for n in fresh.values()]
        self.networks = order
        if dry_run:
            return order
        with _adopt_lock(journal.dir):
            self._run_all(order, journal)
        return order

    def _run_all(self, order: list[Network], journal: Journal) -> None:
        for n in order:
            if n.state in ("refused",):
                continue
            journal.networks[f"{n.profile}/{n.netns}"] = n
            self._switch(n, journal)
            if n.state == "failed":
                break  # stop at the first failure: the operator looks before more networks move

    def _switch(self, n: Network, journal: Journal) -> None:
        n.state, n.error = "switching", ""
        journal.save()  # before anything is stopped: a re-run knows what to finish
        cli = self.cli
        t0 = time.monotonic()
        for name in n.legacy:
            cli.stop(name, STOP_GRACE)
        reply = self._start_confined(n)
        if reply.get("ok"):
            n.outage = round(time.monotonic() - t0, 3)
            n.sidecar, n.pid = str(reply.get("sidecar")), reply.get("pid")
            for name in n.legacy:
                cli.remove(name)
            n.state = "done"
        else:
            n.error = client.describe_error(reply)
            restarted = []
            for name in n.legacy:
                if cli.start(name):
                    restarted.append(name)
            n.error += f"; legacy restarted: {', '.join(restarted) or 'none (removed with --rm)'}"
            n.state = "failed"
        journal.save()

    def _start_confined(self, n: Network) -> dict[str, Any]:
        """Through the channel, as an agent's request: the engine's normal path does the rest."""
        chan_dir = os.path.join(str(self.config.broker.channels_dir), self.channel.name)
        req = client.start_request(n.profile, list(n.argv), netns=n.netns)
        try:
            write_request(chan_dir, req)
        except OSError as e:
            return {"ok": False, "error": {"code": "bad_request",
                                           "message": f"cannot write the request into the channel: {e}"}}
        deadline = time.monotonic() + self.reply_timeout
        reply_path = os.path.join(chan_dir, "outbox", "replies", f"{req['id']}.json")
        while True:
            try:
                self.engine.sync(self.channel.name)
            except OSError as e:
                log.warning("sync %s: %s", self.channel.name, e)
            try:
                with open(reply_path, "rb") as f:
                    reply: dict[str, Any] = json.load(f)
                return reply
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                return {"ok": False, "error": {"code": "runtime_failed", "message": "no reply from the engine"}}
            time.sleep(0.05)


def write_request(channel_dir: str, request: dict[str, Any]) -> str:
    """Put a request into the channel's inbox as root, safely: inbox/ belongs to the agent.

    The agent could have swapped inbox/, inbox/tmp or inbox/new for a symlink to a host folder, so every
    folder is opened relative to its parent with O_NOFOLLOW (client.py's path-based writer is for the
    agent side), the request is written into tmp/ and renamed into new/ between those fds.
    """
    rid = str(request["id"])
    data = json.dumps(request, separators=(",", ":")).encode()
    base = open_dir(channel_dir)
    fds = [base]
    try:
        inbox = open_dir("inbox", base)
        fds.append(inbox)
        tmp = open_dir("tmp", inbox)
        fds.append(tmp)
        new = open_dir("new", inbox)
        fds.append(new)
        fd = os.open(rid, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=tmp)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(rid, f"{rid}.json", src_dir_fd=tmp, dst_dir_fd=new)
    finally:
        for fd in reversed(fds):
            os.close(fd)
    return rid


def report(networks: list[Network]) -> list[dict[str, Any]]:
    return [{"profile": n.profile, "netns": n.netns, "state": n.state, "legacy": n.legacy, "source": n.source,
             "argv": list(n.argv), "reason": n.refused, "error": n.error, "outage_seconds": n.outage,
             "sidecar": n.sidecar or None, "pid": n.pid} for n in networks]


@contextlib.contextmanager
def _adopt_lock(path: str) -> Any:
    """One adopt per channel at a time (a second one fails at once rather than interleave)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(path, "adopt.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def adopt_command(cfg: Config, channel: ChannelConfig, source: str, dry_run: bool, as_json: bool) -> int:
    """`safespawn adopt`: run (or plan) the adoption and print its result; returns the exit code."""
    from ..broker.engine import Engine
    from ..errors import ExitCode

    adoption = Adoption(cfg, channel, Engine(cfg), flavor=source)
    try:
        nets = adoption.run(dry_run=dry_run)
    except BlockingIOError:
        print(f"safespawn adopt: another adopt of channel {channel.name} is running", file=sys.stderr)
        return ExitCode.LOCKED
    except RuntimeFailed as e:
        print(f"safespawn adopt: {e.message}", file=sys.stderr)
        return ExitCode.FAILED
    rows = report(nets)
    if as_json:
        print(json.dumps({"channel": channel.name, "dry_run": dry_run, "networks": rows}, indent=1))
    else:
        verb = "would adopt" if dry_run else "adopted"
        if not rows:
            print(f"no legacy sidecars found (--from {source})")
        for r in rows:
            what = f"{r['profile']} {r['netns']} (legacy: {', '.join(r['legacy'])})"
            if r["state"] == "refused":
                print(f"refused   {what}: {r['reason']} -- left running, untouched")
            elif r["state"] == "done":
                print(f"{verb:<9} {what} -> {r['sidecar']} pid {r['pid']}, outage {r['outage_seconds']} s")
            elif r["state"] == "failed":
                print(f"FAILED    {what}: {r['error']}")
            else:
                print(f"{verb:<9} {what} from {r['source'] or 'the journal'}: {' '.join(r['argv'])[:200]}")
    return ExitCode.FAILED if any(r["state"] == "failed" for r in rows) else ExitCode.OK
