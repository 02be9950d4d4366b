"""A container-aware drop-in for Neutron's ``external_process.ProcessManager``.

Runs inside agent images (copied beside the wrappers as ``safespawn_neutron.py`` by
`safespawn wrappers install`): standard library, Neutron, and the copied ``safespawn_client.py``
only; Python 3.9 compatible. Neutron is imported only when the class is first asked for, so the
status reader below is usable (and tested) without Neutron.

    from safespawn_neutron import ProcessManager          # or: safespawn-neutron neutron-dhcp-agent ...
    pm = ProcessManager(conf, net_id, namespace="qdhcp-" + net_id, service="dnsmasq",
                        default_cmd_callback=cmd, pid_file=pid_file)
    pm.enable(ensure_active=True)   # a start request on the channel, then wait for the host's status
    pm.active                       # reads outbox/status.json (cached by inode): no request, no waiting

What changes against Neutron's class:
- ``enable()`` sends the command that ``cmd_callback(pid_file)`` returns as a start request (the
  program's basename picks the profile) instead of running it under ``ip netns exec``;
- ``reload_cfg()`` and ``disable(sig)`` send signal requests naming the sidecar by profile and
  namespace, not by pid: no kill script, no pid file and no shared pid namespace are needed;
- ``active`` and ``pid`` come from the host-published ``outbox/status.json``: ``active`` is true while
  the host lists the sidecar as running in a status that is not stale; ``pid`` is its *host* pid.
  A missing, unsafe, malformed or stale status means "not active" (and a warning in the log);
  it never blocks: the file is opened with O_NOFOLLOW|O_NONBLOCK, must be a regular file of bounded
  size, and every field is type-checked.
- KeepalivedManager's VRRP-child manager (built with only ``pid_file``, ``...-vrrp``) maps onto
  the keepalived sidecar: the child lives and dies with it.
"""

import errno
import importlib
import json
import logging
import os
import stat
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

try:
    import safespawn_client as client  # beside the wrappers, in the agent image
except ImportError:  # inside the safespawn package (tests, tools)
    from safespawn.agent import client

CHANNEL_DIR_ENV = "SAFESPAWN_CHANNEL_DIR"
STATUS_MAX_BYTES = 4 << 20  # a status of 10,000 sidecars is ~3 MB
STATUS_MAX_AGE_ENV = "SAFESPAWN_STATUS_MAX_AGE"
DEFAULT_REFRESH = 60  # the host's reconcile interval when an old broker does not say
FUTURE_SLACK = 60.0  # a status "updated" further in the future than this is malformed

# Neutron's service names (the ProcessManager's `service`) -> safespawn profiles.
PROFILE_OF_SERVICE = {
    "dnsmasq": "dnsmasq",
    "haproxy": "haproxy",
    "keepalived": "keepalived",
    "radvd": "radvd",
    "neutron-keepalived-state-change-monitor": "neutron-keepalived-state-change",
}
# The programs Neutron's callbacks name (argv[0]) -> profiles.
PROFILE_OF_PROGRAM = {
    "dnsmasq": "dnsmasq",
    "haproxy": "haproxy",
    "keepalived": "keepalived",
    "radvd": "radvd",
    "neutron-keepalived-state-change": "neutron-keepalived-state-change",
}
VRRP_PID_SUFFIX = "-vrrp"  # KeepalivedManager.get_vrrp_pid_file_name
MONITOR_UUID_SUFFIX = ".monitor"  # HaRouter._get_state_change_monitor_process_manager
MONITOR_NETNS_PREFIXES = ("qrouter-", "snat-")

LOG = logging.getLogger(__name__)


class StatusError(Exception):
    """The channel's status cannot be trusted: missing, not a plain file, too big, malformed or stale."""


class SidecarStatus(NamedTuple):
    name: str
    profile: str
    netns: Optional[str]
    key: Optional[str]
    state: str
    pid: Optional[int]
    generation: Optional[str]

    @property
    def running(self) -> bool:
        return self.state == "running" and self.pid is not None


class Snapshot(NamedTuple):
    updated: float
    refresh: int
    sidecars: Tuple[SidecarStatus, ...]
    published: float = 0.0  # sub-second publish time (falls back to `updated`)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_str(entry: Dict[str, Any], field: str, where: str) -> Optional[str]:
    v = entry.get(field)
    if v is not None and not isinstance(v, str):
        raise StatusError("malformed status %s: %s.%s is not a string" % (where, "sidecar", field))
    return v


def parse_status(raw: bytes, where: str = "") -> Snapshot:
    """Check the status's shape and every field the class relies on; raise StatusError if wrong."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, huge ints, absurd nesting
        raise StatusError("malformed status %s: %s" % (where, str(e)[:200])) from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise StatusError("malformed status %s: not a v1 status object" % where)
    updated = doc.get("updated")
    if not (_is_int(updated) or isinstance(updated, float)) or updated != updated:
        raise StatusError("malformed status %s: 'updated' is not a number" % where)
    refresh = doc.get("refresh", DEFAULT_REFRESH)
    if not _is_int(refresh) or refresh <= 0:
        raise StatusError("malformed status %s: 'refresh' is not a positive integer" % where)
    published = doc.get("published", updated)
    if not (_is_int(published) or isinstance(published, float)) or published != published:
        raise StatusError("malformed status %s: 'published' is not a number" % where)
    entries = doc.get("sidecars")
    if not isinstance(entries, list):
        raise StatusError("malformed status %s: 'sidecars' is not a list" % where)
    sidecars = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise StatusError("malformed status %s: a sidecar entry is not an object" % where)
        for field in ("name", "profile", "state"):
            if not isinstance(entry.get(field), str):
                raise StatusError("malformed status %s: sidecar.%s is not a string" % (where, field))
        pid = entry.get("pid")
        if pid is not None and not (_is_int(pid) and 1 < pid < 1 << 22):
            raise StatusError("malformed status %s: sidecar.pid is not a pid" % where)
        sidecars.append(SidecarStatus(entry["name"], entry["profile"], _opt_str(entry, "netns", where),
                                      _opt_str(entry, "key", where), entry["state"], pid,
                                      _opt_str(entry, "generation", where)))
    return Snapshot(float(updated), int(refresh), tuple(sidecars), float(published))  # type: ignore[arg-type]


class ChannelStatus:
    """Reads ``outbox/status.json`` of one channel; re-parses only when the file was replaced.

    The host replaces the file by rename on every publish, so (device, inode, mtime, size) of an
    lstat() identifies one version: a repeated ``active`` costs one lstat() and a dict lookup.
    """

    def __init__(self, channel_dir: str, clock: Callable[[], float] = time.time,
                 max_age: Optional[float] = None) -> None:
        self.path = os.path.join(channel_dir, "outbox", "status.json")
        self.clock = clock
        self.max_age = max_age
        self._lock = threading.Lock()
        self._sig = None  # type: Optional[Tuple[int, int, int, int]]
        self._cached = None  # type: Optional[Snapshot]
        self._cached_error = None  # type: Optional[StatusError]
        # What this process's own requests just did, until the host publishes a status after them.
        self._expected = {}  # type: Dict[Tuple[str, Optional[str]], Tuple[Optional[SidecarStatus], float]]

    def _load(self) -> Snapshot:
        try:
            st = os.lstat(self.path)
        except OSError as e:
            raise StatusError("no channel status at %s (%s): is the host's safespawn broker serving this "
                              "channel?" % (self.path, os.strerror(e.errno or errno.ENOENT))) from None
        if not stat.S_ISREG(st.st_mode):
            # A symlink, FIFO or directory is never what the host writes.
            raise StatusError("channel status %s is not a plain file" % self.path)
        sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if sig == self._sig:
                if self._cached_error is not None:
                    raise self._cached_error
                assert self._cached is not None
                return self._cached
        snap = None  # type: Optional[Snapshot]
        err = None  # type: Optional[StatusError]
        try:
            snap = self._read(st)
        except StatusError as e:
            err = e
        with self._lock:
            self._sig, self._cached, self._cached_error = sig, snap, err
        if err is not None:
            raise err
        assert snap is not None
        return snap

    def _read(self, st: os.stat_result) -> Snapshot:
        if st.st_size > STATUS_MAX_BYTES:
            raise StatusError("channel status %s is larger than %d bytes" % (self.path, STATUS_MAX_BYTES))
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            raise StatusError("cannot open channel status %s: %s" % (self.path, os.strerror(e.errno or 0))) from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise StatusError("channel status %s changed while it was opened" % self.path)
            chunks = []
            left = STATUS_MAX_BYTES + 1
            while left > 0:
                b = os.read(fd, min(left, 1 << 16))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
        finally:
            os.close(fd)
        raw = b"".join(chunks)
        if len(raw) > STATUS_MAX_BYTES:
            raise StatusError("channel status %s is larger than %d bytes" % (self.path, STATUS_MAX_BYTES))
        return parse_status(raw, self.path)

    def snapshot(self) -> Snapshot:
        """The current status, or StatusError when it is missing, unsafe, malformed or stale."""
        snap = self._load()
        now = self.clock()
        max_age = self.max_age
        if max_age is None:
            max_age = client._float_env(STATUS_MAX_AGE_ENV, 0.0) or (2.0 * snap.refresh + 10.0)
        if snap.updated > now + FUTURE_SLACK:
            raise StatusError("channel status %s is dated in the future" % self.path)
        if now - snap.updated > max_age:
            raise StatusError("channel status %s is stale: published %.0fs ago, the host republishes every "
                              "%ds; is its safespawn broker running?" % (self.path, now - snap.updated, snap.refresh))
        return snap

    def expect(self, profile: str, netns: Optional[str], sidecar: Optional[SidecarStatus], since: float) -> None:
        """Our request was answered at `since`: until the status agrees, or a status published after
        `since` says otherwise, the sidecar is `sidecar` (running with the reply's pid) or gone (None).

        The host writes the reply and then the status in the same sync, so this only covers that
        gap: Neutron's callers (ra.DaemonMonitor, KeepalivedManager.spawn) read `active` right after
        enable() returns, as they read the pid file a daemonizing program has written.
        """
        with self._lock:
            self._expected[(profile, netns)] = (sidecar, since)

    def find(self, profile: str, netns_candidates: List[Optional[str]]) -> Optional[SidecarStatus]:
        """The channel's sidecar of `profile` in the first of the namespaces that has one."""
        snap = self.snapshot()
        by_netns = {s.netns: s for s in snap.sidecars if s.profile == profile}
        for ns in netns_candidates:
            listed = by_netns.get(ns)
            with self._lock:
                expected = self._expected.get((profile, ns))
                if expected is not None:
                    agrees = (listed is not None and listed.running) == (expected[0] is not None)
                    if agrees or snap.published >= expected[1]:
                        # The status shows what the reply said, or was published after the reply
                        # arrived: from here on the host's word is the only one.
                        del self._expected[(profile, ns)]
                        expected = None
            if expected is not None:
                if expected[0] is not None:
                    return expected[0]
                continue
            if ns in by_netns:
                return by_netns[ns]
        return None


_STATUS = {}  # type: Dict[str, ChannelStatus]
_STATUS_LOCK = threading.Lock()


def channel_status(channel_dir: str) -> ChannelStatus:
    """One reader (one cache) per channel in this process, shared by every ProcessManager."""
    with _STATUS_LOCK:
        if channel_dir not in _STATUS:
            _STATUS[channel_dir] = ChannelStatus(channel_dir)
        return _STATUS[channel_dir]


def profile_for(service: Optional[str], pid_file: Optional[str]) -> Optional[str]:
    """The profile a Neutron ProcessManager stands for, from its service (or the VRRP child's pid file)."""
    if service in PROFILE_OF_SERVICE:
        return PROFILE_OF_SERVICE[service]
    if pid_file and pid_file.endswith(VRRP_PID_SUFFIX):
        return "keepalived"  # KeepalivedManager._get_vrrp_process: keepalived's VRRP child
    return None


def netns_candidates(profile: Optional[str], uuid: str, namespace: Optional[str]) -> List[Optional[str]]:
    """Where the sidecar runs: the manager's namespace, or for the state-change monitor (which Neutron
    starts outside any namespace) the router's namespace that its uuid, ROUTER.monitor, names."""
    if namespace:
        return [namespace]
    if profile == "neutron-keepalived-state-change" and uuid.endswith(MONITOR_UUID_SUFFIX):
        router = uuid[:-len(MONITOR_UUID_SUFFIX)]
        return [p + router for p in MONITOR_NETNS_PREFIXES]
    return [None]


_CLASS = None  # type: Any


def process_manager_class() -> Any:
    """Build (once) the subclass of Neutron's ProcessManager that talks to the channel."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


def install(external_process: Any = None) -> Any:
    """Make `external_process.ProcessManager` the channel-aware class (idempotent); return the class.

    Neutron's callers (dhcp, keepalived, ha_router, metadata driver_base, ra, conntrackd) all look
    the class up as ``external_process.ProcessManager`` when they build a manager, so replacing the
    module attribute is enough.
    """
    if external_process is None:
        external_process = importlib.import_module("neutron.agent.linux.external_process")
    cls = process_manager_class()
    if external_process.ProcessManager is not cls:
        external_process.ProcessManager = cls
    return cls


def __getattr__(name: str) -> Any:  # `from safespawn_neutron import ProcessManager`
    if name == "ProcessManager":
        return process_manager_class()
    raise AttributeError(name)


def _build_class() -> Any:
    from neutron.agent.linux import external_process
    from neutron.common import utils as common_utils
    from neutron_lib import exceptions as n_exc
    from oslo_log import log as oslo_logging

    log = oslo_logging.getLogger(__name__)
    base = getattr(external_process, "_safespawn_original", None) or external_process.ProcessManager
    external_process._safespawn_original = base

    class ChannelProcessManager(base):  # type: ignore[misc,valid-type]
        """Neutron's ProcessManager interface over a safespawn channel (see the module docstring)."""

        def __init__(self, conf: Any, uuid: str, namespace: Optional[str] = None, service: Optional[str] = None,
                     pids_path: Optional[str] = None, default_cmd_callback: Any = None,
                     cmd_addl_env: Optional[Dict[str, str]] = None, pid_file: Optional[str] = None,
                     run_as_root: bool = False, custom_reload_callback: Any = None,
                     default_pre_cmd_callback: Any = None, default_post_cmd_callback: Any = None,
                     async_process: bool = False, channel_dir: Optional[str] = None) -> None:
            super().__init__(conf, uuid, namespace=namespace, service=service, pids_path=pids_path,
                             default_cmd_callback=default_cmd_callback, cmd_addl_env=cmd_addl_env,
                             pid_file=pid_file, run_as_root=run_as_root,
                             custom_reload_callback=custom_reload_callback,
                             default_pre_cmd_callback=default_pre_cmd_callback,
                             default_post_cmd_callback=default_post_cmd_callback, async_process=async_process)
            channel_dir = channel_dir or os.environ.get(CHANNEL_DIR_ENV)
            if not channel_dir:
                raise RuntimeError("safespawn ProcessManager: no channel directory (set %s, or run the agent "
                                   "through safespawn-neutron)" % CHANNEL_DIR_ENV)
            self.channel_dir = channel_dir
            self.channel_status = channel_status(channel_dir)
            self.profile = profile_for(service, pid_file)
            self._last_warning = None  # type: Optional[str]
            self.status_unknown = False  # the last look at the status failed (StatusError)

        # -- what the host publishes ---------------------------------------------------------
        def sidecar(self) -> Optional[SidecarStatus]:
            """This manager's sidecar as the host's status lists it; None if absent or unknowable."""
            if self.profile is None:
                return None
            try:
                s = self.channel_status.find(self.profile, netns_candidates(self.profile, self.uuid,
                                                                            self.namespace))
            except StatusError as e:
                self.status_unknown = True
                msg = str(e)
                if msg != self._last_warning:  # once per distinct problem, not every check interval
                    log.warning("%s for %s: %s", self.service, self.uuid, msg)
                    self._last_warning = msg
                return None
            self._last_warning = None
            self.status_unknown = False
            return s

        @property
        def active(self) -> bool:
            s = self.sidecar()
            return s is not None and s.running

        @property
        def pid(self) -> Optional[int]:
            """The sidecar's host pid (for logs; nothing is signalled by pid)."""
            s = self.sidecar()
            return s.pid if s is not None and s.running else None

        @property
        def cmdline(self) -> Optional[str]:
            s = self.sidecar()
            if s is None or not s.running:
                return None
            return "%s (safespawn sidecar %s, %s)" % (self.profile, s.name, self.uuid)

        @property
        def generation(self) -> Optional[str]:
            """Changes whenever the sidecar's process is replaced (see docs/channel.md)."""
            s = self.sidecar()
            return s.generation if s is not None and s.running else None

        # -- requests -------------------------------------------------------------------------
        def _ask(self, request: Dict[str, Any]) -> Dict[str, Any]:
            try:
                reply = client.submit(self.channel_dir, request, timeout=client._timeout_from_env())
                return dict(reply)
            except client.NoBroker as e:
                raise n_exc.ProcessExecutionError(str(e), returncode=client.EXIT_NO_BROKER) from None
            except OSError as e:
                raise n_exc.ProcessExecutionError("cannot write to the safespawn channel %s: %s"
                                                  % (self.channel_dir, e), returncode=client.EXIT_FAILED) from None

        def _start(self, cmd: List[str]) -> Dict[str, Any]:
            program = os.path.basename(str(cmd[0])) if cmd else ""
            profile = PROFILE_OF_PROGRAM.get(program)
            if profile is None:
                raise n_exc.ProcessExecutionError("safespawn: no sidecar profile runs %r" % program,
                                                  returncode=client.EXIT_FAILED)
            args = client.program_args([str(a) for a in cmd[1:]])
            if profile == "haproxy":
                # As the wrapper does: the config's pidfile becomes -p, which the host writes (the
                # sidecar runs as an unprivileged uid that cannot create files in the agent's dirs).
                args = client.haproxy_pid_file_args(args)
            netns = self.namespace
            if profile in client.NETNS_OPTIONS:
                netns = client.option_value(args, client.NETNS_OPTIONS[profile]) or netns
            reply = self._ask(client.start_request(profile, args, netns=netns))
            since = time.time()
            if not reply.get("ok"):
                raise n_exc.ProcessExecutionError("%s: refused by safespawn: %s"
                                                  % (profile, client.describe_error(reply)),
                                                  returncode=client.EXIT_FAILED)
            if self.profile is None:
                self.profile = profile
            pid = reply.get("pid")
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1:
                self.channel_status.expect(profile, netns, SidecarStatus(
                    str(reply.get("sidecar")), profile, netns, netns, "running", pid, None), since)
            log.debug("%s for %s runs as sidecar %s (host pid %s)", profile, self.uuid, reply.get("sidecar"),
                      reply.get("pid"))
            return reply

        def _signal(self, sig: str) -> None:
            s = self.sidecar()
            if self.profile is None or (s is None and not self.status_unknown):
                return
            # Without a readable status, name the sidecar by where it would run: the host answers
            # not_found if there is none.
            netns = s.netns if s is not None else netns_candidates(self.profile, self.uuid, self.namespace)[0]
            reply = self._ask(client.signal_request(str(sig), profile=self.profile, netns=netns))
            since = time.time()
            if reply.get("ok"):
                if str(sig).upper().lstrip("SIG") in ("15", "9", "TERM", "KILL"):
                    self.channel_status.expect(self.profile, netns, None, since)  # stopped and removed
                return
            if (reply.get("error") or {}).get("code") == "not_found":
                log.debug("%s for %s was gone when signal %s was sent", self.service, self.uuid, sig)
                return
            raise n_exc.ProcessExecutionError("%s: signal %s refused by safespawn: %s"
                                              % (self.profile, sig, client.describe_error(reply)),
                                              returncode=client.EXIT_FAILED)

        # -- Neutron's interface --------------------------------------------------------------
        def enable(self, cmd_callback: Any = None, reload_cfg: bool = False, ensure_active: bool = False,
                   pre_cmd_callback: Any = None, post_cmd_callback: Any = None) -> None:
            if not self.active:
                pre = pre_cmd_callback or self.default_pre_cmd_callback
                if pre:
                    pre()
                callback = cmd_callback or self.default_cmd_callback
                if callback is None:
                    raise n_exc.ProcessExecutionError("%s for %s: no command to start" % (self.service, self.uuid),
                                                      returncode=client.EXIT_FAILED)
                self._start(list(callback(self.get_pid_file_name())))
                post = post_cmd_callback or self.default_post_cmd_callback
                if post:
                    post()
            elif reload_cfg:
                self.reload_cfg()
            if ensure_active:
                # The host publishes the status right after the reply, in the same sync.
                common_utils.wait_until_true(lambda: self.active)

        def reload_cfg(self) -> None:
            if self.custom_reload_callback:
                self.disable(get_stop_command=self.custom_reload_callback, delete_pid_file=False)
            else:
                self.disable("HUP", delete_pid_file=False)

        def disable(self, sig: str = "9", get_stop_command: Any = None, delete_pid_file: bool = True) -> None:
            delete_pid_file = delete_pid_file or str(sig) == "9"
            # A stop must not depend on the status being readable: when it is not, ask anyway.
            if self.active or (self.status_unknown and not get_stop_command):
                if get_stop_command:
                    # An operator's own stop command, run as Neutron would run it.
                    self._kill_process(get_stop_command(self.get_pid_file_name()), self.pid)
                else:
                    self._signal(str(sig))
                if delete_pid_file:
                    try:
                        os.unlink(self.get_pid_file_name())
                    except OSError:
                        pass
            else:
                log.debug("No %s sidecar runs for %s", self.service, self.uuid)

    ChannelProcessManager.__module__ = __name__
    return ChannelProcessManager
