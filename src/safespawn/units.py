"""The systemd trigger: `safespawn install`, `safespawn uninstall` and `safespawn rearm`.

One template pair per host and one instance per channel, plus a timer as the safety net:

    safespawn-sync@CH.path         DirectoryNotEmpty=CHANNELS/CH/inbox/new   level: re-checked every time
                                   PathChanged=CHANNELS/CH/inbox/trigger     the spec's edge: an early start
      -> safespawn-sync@CH.service    Type=oneshot: `safespawn sync CH` (drains until the inbox is empty)
    safespawn-reconcile.timer      at boot, then every `broker.reconcile_interval` seconds
      -> safespawn-reconcile.service  `safespawn rearm` (restart failed path units), then
                                      `safespawn sync --all --no-wait` (serve and reconcile every channel)

Why nothing is lost (the predecessor's units lost requests in each of these ways):
- A request that arrives while the sync runs is not an event that can be missed: when the oneshot
  exits, systemd re-checks DirectoryNotEmpty= and starts it again if anything waits.
- The service has no start limit (StartLimitIntervalSec=0): each run is serialized by the channel lock
  and ends when the inbox is empty, so the number of runs is bounded by the requests themselves.
- The path unit's trigger limit is set on purpose, above what requests (or an agent hammering
  inbox/trigger) can produce, so only a sync that fails at once in a loop trips it. A path unit that
  systemd failed anyway is re-armed by the timer, which also serves whatever waits: the delay is one
  timer interval at most, and nothing is lost.

`install` is idempotent (a second run changes nothing and says so) and records what it created in
`state_dir/install.json`, so `uninstall` removes exactly that. Shell example::

    safespawn install --scope system            # dirs, units, daemon-reload, enable --now
    systemctl list-units 'safespawn-*'
    journalctl -u 'safespawn-sync@*' -f
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, config_path, load_config
from .errors import ExitCode, InstallError, RuntimeFailed
from .files import atomic_write, open_dir
from .inbox import channel_layout, create_channel_dirs

log = logging.getLogger(__name__)

SCOPES = ("system", "user")
SYNC_PATH = "safespawn-sync@.path"
SYNC_SERVICE = "safespawn-sync@.service"
RECONCILE_TIMER = "safespawn-reconcile.timer"
RECONCILE_SERVICE = "safespawn-reconcile.service"
UNIT_NAMES = (SYNC_PATH, SYNC_SERVICE, RECONCILE_SERVICE, RECONCILE_TIMER)
MARKER = "# Installed by `safespawn install`: change the configuration and re-run it rather than edit this file."
MANIFEST = "install.json"
SYSTEMCTL_TIMEOUT = 60

# Trigger limit of the path units. systemd counts activations of the service, and drops its watches
# while the service runs, so hammering inbox/trigger during a sync counts nothing; a real sync takes
# at least ~0.2 s (Python start plus one `podman ps`), so requests alone start it at most a few times a
# second (measured: ~2/s while another process touched the trigger file 20000 times a second). Only
# a run that fails at once -- the executable gone after an upgrade -- can go above 10/s for 10 s, and
# that loop is what this stops. The timer re-arms the unit (and serves the channel) meanwhile.
TRIGGER_LIMIT_INTERVAL = "10s"
TRIGGER_LIMIT_BURST = 100
# A sync that hangs (podman stuck past its own per-call timeouts) is killed after this; the ledger
# makes the interrupted run safe to replay, and the path unit starts the next one.
SYNC_TIMEOUT = "15min"
# Capabilities the broker and podman never need; dropping them from the bounding set also takes them
# out of reach of every sidecar (conmon and crun inherit it), whatever a profile says.
DROPPED_CAPABILITIES = ("CAP_SYS_MODULE", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_WAKE_ALARM", "CAP_SYSLOG",
                        "CAP_SYS_PACCT", "CAP_BLOCK_SUSPEND")
# Characters a path may carry into a unit file unquoted and unescaped.
UNIT_PATH_RE = re.compile(r"/[A-Za-z0-9_./+@:,-]*")


# -- unit text ---------------------------------------------------------------------------------


def _unit_path(p: str, what: str) -> str:
    # DENY: a path with spaces, quotes, '%' or newlines would change the meaning of a unit line.
    if not UNIT_PATH_RE.fullmatch(p) or "//" in p:
        raise InstallError(f"{what} {p!r}: only absolute paths of letters, digits and _./+@:,- can go into a "
                           "unit file")
    return p


def render_units(cfg: Config, scope: str, executable: str, config_file: str) -> dict[str, str]:
    """The text of the four unit files for this configuration, by file name."""
    exe = _unit_path(executable, "executable")
    conf = _unit_path(config_file, "configuration file")
    channels = _unit_path(str(cfg.broker.channels_dir), "broker.channels_dir")
    interval = cfg.broker.reconcile_interval
    head = f"{MARKER}\n# See docs/operations.md. Scope: {scope}; configuration: {conf}.\n"
    sync_path = f"""{head}
[Unit]
Description=safespawn: watch the inbox of channel %i

[Path]
Unit=safespawn-sync@%i.service
# Level-triggered: checked again each time the service finishes, so a request that arrived while it
# ran starts it again. This, not the trigger file, is what guarantees that nothing waits forever.
DirectoryNotEmpty={channels}/%i/inbox/new
# The spec's trigger file, touched by the client after each request.
PathChanged={channels}/%i/inbox/trigger
# Set on purpose: systemd counts activations, and drops its watches while the service runs, so no
# burst of requests (nor an agent hammering the trigger file) comes near 10 runs a second for 10 s;
# a sync that fails at once in a loop does, and is stopped. A failed path unit is re-armed by
# safespawn-reconcile.timer (which also serves the channel) within {interval}s.
TriggerLimitIntervalSec={TRIGGER_LIMIT_INTERVAL}
TriggerLimitBurst={TRIGGER_LIMIT_BURST}

[Install]
WantedBy=paths.target
"""
    hardening = f"""# Hardening that leaves podman working. Options that give the service a mount namespace
# (ProtectSystem=, PrivateTmp=, ReadWritePaths=, ...) are not set: the sidecars' mounts would live in it,
# out of reach of the host. Seccomp-based options are inherited by every sidecar (conmon and crun are
# children of this service), so only the ones no sidecar can miss are set. NoNewPrivileges= is not set:
# it blocks the SELinux transition of podman into container_runtime_t.
SystemCallArchitectures=native
LockPersonality=yes
CapabilityBoundingSet=~{' '.join(DROPPED_CAPABILITIES)}"""
    sync_service = f"""{head}
[Unit]
Description=safespawn: serve the requests of channel %i
# No start limit: the predecessor's oneshot failed after 5 starts in 10s and its path unit stopped
# watching. Runs are serialized by the channel lock and each ends when the inbox is empty.
StartLimitIntervalSec=0

[Service]
Type=oneshot
Environment=SAFESPAWN_CONFIG={conf}
ExecStart={exe} sync %i
# Sidecars are detached podman containers whose conmon may stay in this unit's cgroup: when the
# sync exits, only it is stopped, never them.
KillMode=process
TimeoutStartSec={SYNC_TIMEOUT}
SyslogIdentifier=safespawn-sync
{hardening}
"""
    reconcile_service = f"""{head}
[Unit]
Description=safespawn: re-arm failed path units, serve and reconcile every channel
# Paced by its timer.
StartLimitIntervalSec=0

[Service]
Type=oneshot
Environment=SAFESPAWN_CONFIG={conf}
# Restart the safespawn-sync@ path units systemd put in the failed state (trigger limit hit). A failure
# here must not keep the sync below from running, hence '-'.
ExecStartPre=-{exe} rearm --scope {scope}
# --no-wait: a channel whose sync runs right now is being served already.
ExecStart={exe} sync --all --no-wait
SuccessExitStatus={int(ExitCode.LOCKED)}
KillMode=process
TimeoutStartSec={SYNC_TIMEOUT}
SyslogIdentifier=safespawn-reconcile
{hardening}
"""
    timer = f"""{head}
[Unit]
Description=safespawn: reconcile every channel at boot and every {interval}s

[Timer]
OnBootSec=10s
OnUnitActiveSec={interval}s
AccuracySec=1s

[Install]
WantedBy=timers.target
"""
    return {SYNC_PATH: sync_path, SYNC_SERVICE: sync_service, RECONCILE_SERVICE: reconcile_service,
            RECONCILE_TIMER: timer}


def path_unit(channel: str) -> str:
    return f"safespawn-sync@{channel}.path"


def sync_service(channel: str) -> str:
    return f"safespawn-sync@{channel}.service"


def default_unit_dir(scope: str) -> Path:
    if scope == "system":
        return Path("/etc/systemd/system")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "systemd" / "user"


def default_executable() -> str:
    """The absolute path of the `safespawn` command that is running (or the one beside this Python)."""
    candidates = []
    if os.path.basename(sys.argv[0]) == "safespawn":
        candidates.append(os.path.abspath(sys.argv[0]))
    candidates.append(os.path.join(os.path.dirname(sys.executable), "safespawn"))
    found = shutil.which("safespawn")
    if found:
        candidates.append(os.path.abspath(found))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise InstallError("cannot find the `safespawn` command; pass --executable PATH")


# -- systemctl ---------------------------------------------------------------------------------


class Systemctl:
    """`systemctl [--user] ...` as argv lists, with timeouts."""

    def __init__(self, scope: str) -> None:
        self.argv = ["systemctl", "--user"] if scope == "user" else ["systemctl"]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            p = subprocess.run([*self.argv, *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT,
                               check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InstallError(f"{' '.join(self.argv)} {' '.join(args)}: {e}") from None
        if check and p.returncode != 0:
            raise InstallError(f"{' '.join(self.argv)} {' '.join(args)} failed (rc {p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()[-500:]}")
        return p

    def show(self, units: Iterable[str], props: tuple[str, ...] = ("ActiveState", "UnitFileState", "LoadState",
                                                                    "Result")) -> dict[str, dict[str, str]]:
        units = list(units)
        if not units:
            return {}
        out = self.run("show", "--property=Id," + ",".join(props), "--", *units).stdout
        blocks = [b for b in out.split("\n\n") if b.strip()]
        result: dict[str, dict[str, str]] = {}
        for unit, block in zip(units, blocks, strict=False):
            kv = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
            result[unit] = kv
        return result

    def list_units(self, pattern: str, state: str | None = None) -> list[str]:
        args = ["list-units", "--all", "--full", "--plain", "--no-legend", "--no-pager"]
        if state:
            args.append(f"--state={state}")
        out = self.run(*args, "--", pattern).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()]


# -- the record of what install created ----------------------------------------------------------


@dataclass
class Manifest:
    scope: str = "system"
    unit_dir: str = ""
    units: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # created by install, parents first
    channels: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> Manifest | None:
        try:
            data = json.loads((state_dir / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise InstallError(f"{state_dir / MANIFEST}: unreadable ({e}); remove it to start afresh") from None
        return cls(scope=str(data.get("scope", "system")), unit_dir=str(data.get("unit_dir", "")),
                   units=list(data.get("units", [])), dirs=list(data.get("dirs", [])),
                   channels=list(data.get("channels", [])))

    def save(self, state_dir: Path) -> None:
        data = {"v": 1, "scope": self.scope, "unit_dir": self.unit_dir, "units": self.units, "dirs": self.dirs,
                "channels": self.channels}
        fd = open_dir(str(state_dir))
        try:
            atomic_write(fd, MANIFEST, json.dumps(data, indent=1).encode() + b"\n", mode=0o600)
        finally:
            os.close(fd)


def _add(items: list[str], *new: str) -> None:
    for n in new:
        if n not in items:
            items.append(n)


# -- install ---------------------------------------------------------------------------------


class Report:
    """What install/uninstall did (or, with --dry-run, would do), one line per change."""

    def __init__(self, command: str, dry_run: bool) -> None:
        self.command = command
        self.dry_run = dry_run
        self.changes = 0
        self.planned: set[str] = set()  # directories a dry run would have created

    def change(self, what: str) -> bool:
        """Announce a change; returns whether to perform it."""
        self.changes += 1
        print(("would " if self.dry_run else "") + what)
        return not self.dry_run

    def note(self, what: str) -> None:
        print(f"note: {what}")

    def summary(self) -> None:
        if self.changes == 0:
            print(f"safespawn {self.command}: nothing to change")
        elif self.dry_run:
            print(f"safespawn {self.command}: {self.changes} change(s) to make (dry run: nothing done)")
        else:
            print(f"safespawn {self.command}: {self.changes} change(s) made")


def _makedirs(path: Path, mode: int, report: Report) -> list[str]:
    """Create `path` and missing parents; returns the directories created, parents first."""
    missing = []
    p = path
    while not os.path.lexists(p) and str(p) not in report.planned:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        if report.change(f"create directory {d} (mode {mode:04o})"):
            os.mkdir(d, mode)
            os.chmod(d, mode)
        report.planned.add(str(d))
        created.append(str(d))
    return created


def _private_dir(path: Path, report: Report) -> list[str]:
    """A host-private directory: root-owned, 0700. Returns [path] if it was created."""
    if not os.path.lexists(path):
        return _makedirs(path, 0o700, report) if str(path) not in report.planned else []
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InstallError(f"{path} exists and is not a directory")
    private = stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (0, 0)
    if not private and report.change(f"make {path} host-private (root, mode 0700; was "
                                     f"{stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid})"):
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, 0o700)
    return []


def _channel_dirs(base: Path, uid: int, gid: int, report: Report) -> bool:
    """Lay out a channel's directories with create_channel_dirs; returns whether base was created."""
    existed = os.path.lexists(base)
    if report.dry_run:
        for path, mode, puid, pgid in channel_layout(str(base), uid, gid):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                report.change(f"create directory {path} (mode {mode:04o}, owner {puid}:{pgid})")
                report.planned.add(path)
                continue
            if stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != (puid, pgid):
                report.change(f"fix {path} (mode {mode:04o}, owner {puid}:{pgid})")
        return not existed
    missing = {path for path, _, _, _ in channel_layout(str(base), uid, gid) if not os.path.lexists(path)}
    for path in create_channel_dirs(str(base), uid, gid):
        report.changes += 1
        print(f"{'create' if path in missing else 'fix owner and mode of'} directory {path}")
    return not existed


def _write_unit(unit_dir: Path, name: str, text: str, report: Report) -> bool:
    path = unit_dir / name
    try:
        if path.read_text() == text and not path.is_symlink():
            return False
    except FileNotFoundError:
        pass
    if report.change(f"write {path}"):
        fd = open_dir(str(unit_dir))
        try:
            atomic_write(fd, name, text.encode(), mode=0o644)
        finally:
            os.close(fd)
    return True


def install(cfg: Config, *, scope: str, channels: list[str], unit_dir: Path, executable: str, config_file: str,
            dry_run: bool = False) -> int:
    report = Report("install", dry_run)
    b = cfg.broker
    for ch in channels:
        cfg.channel(ch)
    units = render_units(cfg, scope, executable, config_file)
    manifest = Manifest.load(b.state_dir) or Manifest()
    if manifest.unit_dir and manifest.unit_dir != str(unit_dir) and manifest.units:
        raise InstallError(f"units were installed into {manifest.unit_dir} ({manifest.scope} scope); run "
                           "`safespawn uninstall` first to move them")
    manifest.scope, manifest.unit_dir = scope, str(unit_dir)

    # 1. directories: the channel (agent-facing) and host-private state.
    _add(manifest.dirs, *_makedirs(b.channels_dir, 0o755, report))
    _add(manifest.dirs, *_private_dir(b.state_dir, report))
    for ch in channels:
        c = cfg.channel(ch)
        if _channel_dirs(b.channels_dir / ch, c.agent_uid, c.agent_gid, report):
            _add(manifest.dirs, str(b.channels_dir / ch))
        _add(manifest.dirs, *_private_dir(b.state_dir / ch, report))
        _private_dir(b.state_dir / ch / "quarantine", report)
        _add(manifest.channels, ch)

    # 2. unit files.
    if not unit_dir.is_dir():
        _makedirs(unit_dir, 0o755, report)
    changed = {name for name, text in units.items() if _write_unit(unit_dir, name, text, report)}
    _add(manifest.units, *units)

    # 3. the manager: reload, enable, start (restart what changed, re-arm what failed). What was
    # created is recorded even if systemctl fails below, so that uninstall can still remove it.
    try:
        _activate(channels, changed, scope, report)
    finally:
        if report.changes and not dry_run:
            manifest.save(b.state_dir)
    report.summary()
    return ExitCode.OK


def _activate(channels: list[str], changed: set[str], scope: str, report: Report) -> None:
    dry_run = report.dry_run
    sc = Systemctl(scope)
    wanted = [path_unit(ch) for ch in channels] + [RECONCILE_TIMER]
    if changed and report.change(f"reload the {scope} manager (systemctl daemon-reload)"):
        sc.run("daemon-reload")
    try:
        states = sc.show(wanted)
    except InstallError:
        if not dry_run:
            raise
        states = {}
    to_enable = [u for u in wanted if states.get(u, {}).get("UnitFileState") != "enabled"]
    if to_enable and report.change(f"enable {' '.join(to_enable)}"):
        sc.run("enable", "--", *to_enable)
    for u in wanted:
        st = states.get(u, {})
        active = st.get("ActiveState", "inactive")
        template = SYNC_PATH if u.endswith(".path") else u
        if active == "failed":
            if report.change(f"re-arm {u} (it failed: {st.get('Result', '?')})"):
                sc.run("reset-failed", "--", u)
                sc.run("start", "--", u)
        elif active not in ("active", "activating", "reloading"):
            if report.change(f"start {u}"):
                sc.run("start", "--", u)
        elif template in changed and report.change(f"restart {u} (its unit file changed)"):
            sc.run("restart", "--", u)


# -- uninstall -------------------------------------------------------------------------------


def _stop_sidecars(cfg: Config, channel: str, report: Report) -> int:
    from .runtime import PodmanRuntime

    runtime = PodmanRuntime(cfg.broker.podman, cfg.broker.podman_timeout)
    containers = runtime.list(channel)
    if not containers or not report.change(f"stop {len(containers)} sidecar(s) of channel {channel}"):
        return 0
    failed = 0

    def stop(name: str) -> None:
        nonlocal failed
        try:
            runtime.remove(name)
        except RuntimeFailed as e:
            failed += 1
            print(f"safespawn uninstall: {e.message}", file=sys.stderr)

    with ThreadPoolExecutor(max_workers=max(4, cfg.broker.parallel_starts)) as pool:
        list(pool.map(stop, [c.name for c in containers]))
    return failed


def _is_ours(path: Path) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and MARKER in path.read_text()
    except OSError:
        return False


def uninstall(cfg: Config, *, scope: str | None, unit_dir: Path | None, stop_sidecars: bool,
              dry_run: bool = False) -> int:
    report = Report("uninstall", dry_run)
    b = cfg.broker
    manifest = Manifest.load(b.state_dir) or Manifest()
    scope = scope or manifest.scope or "system"
    unit_dir = unit_dir or (Path(manifest.unit_dir) if manifest.unit_dir else default_unit_dir(scope))
    channels = sorted(set(cfg.channels) | set(manifest.channels))
    sc = Systemctl(scope)

    # 1. stop watching first, then stop whatever runs; never the sidecars (KillMode=process).
    try:
        loaded = set(sc.list_units("safespawn-*"))
        states = sc.show(sorted({path_unit(ch) for ch in channels} | {RECONCILE_TIMER} | loaded))
    except InstallError as e:
        # No manager to talk to (a chroot, an image build, a host not booted with systemd): nothing
        # runs, so removing the files is the whole job, including what `enable` linked.
        loaded, states = set(), {}
        report.note(f"the {scope} manager cannot be reached, only files are removed ({e})")
        for wants in ("paths.target.wants", "timers.target.wants"):
            for link in sorted((unit_dir / wants).glob("safespawn-*")) if (unit_dir / wants).is_dir() else []:
                if link.is_symlink() and report.change(f"remove {link}"):
                    link.unlink()
    watchers = [u for u, st in states.items() if u.endswith((".path", ".timer"))
                and (st.get("UnitFileState") == "enabled" or st.get("ActiveState") not in ("inactive", None)
                     or u in loaded)]
    if watchers and report.change(f"disable and stop {' '.join(watchers)}"):
        sc.run("disable", "--now", "--", *watchers, check=False)
    running = [u for u, st in states.items() if u.endswith(".service")
               and st.get("ActiveState") in ("active", "activating", "deactivating")]
    if running and report.change(f"stop {' '.join(running)}"):
        sc.run("stop", "--", *running, check=False)

    # 2. unit files (only the ones carrying install's marker).
    removed = False
    for name in sorted(set(UNIT_NAMES) | set(manifest.units)):
        path = unit_dir / name
        if _is_ours(path):
            removed = True
            if report.change(f"remove {path}"):
                path.unlink()
    if (removed or watchers) and states and report.change(f"reload the {scope} manager (systemctl daemon-reload)"):
        sc.run("daemon-reload", check=False)
        sc.run("reset-failed", "--", "safespawn-*", check=False)

    # 3. sidecars: left running unless asked; their state stays so that a re-install resumes them.
    keep_state = not stop_sidecars
    failed = 0
    for ch in channels:
        if stop_sidecars:
            failed += _stop_sidecars(cfg, ch, report)
        else:
            try:
                from .runtime import PodmanRuntime

                n = len(PodmanRuntime(b.podman, b.podman_timeout).list(ch))
            except RuntimeFailed:
                n = 0
            if n:
                report.note(f"left {n} sidecar(s) of channel {ch} running, and their state in {b.state_dir / ch}; "
                            "`safespawn uninstall --stop-sidecars` removes both")

    # 4. directories install created, children first; host-private state only with the sidecars.
    remaining: list[str] = []
    for d in reversed(manifest.dirs):
        p = Path(d)
        is_state = p == b.state_dir or b.state_dir in p.parents
        if not os.path.lexists(p):
            continue
        if is_state and keep_state:
            remaining.insert(0, d)
            continue
        shared = p in (b.channels_dir, b.state_dir) or p in b.channels_dir.parents or p in b.state_dir.parents
        # Shared parents are removed only once empty (another configuration may use them).
        if shared and any(os.scandir(p)) and not (p == b.state_dir and _only_manifest(p)):
            remaining.insert(0, d)
            continue
        if report.change(f"remove {p}{'/' if p.is_dir() else ''}"):
            if p == b.state_dir:
                _remove_quiet(p / MANIFEST)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not dry_run:
        if remaining and os.path.isdir(b.state_dir):
            Manifest(scope=scope, unit_dir=str(unit_dir), dirs=remaining, channels=channels).save(b.state_dir)
        else:
            _remove_quiet(b.state_dir / MANIFEST)
    report.summary()
    return ExitCode.FAILED if failed else ExitCode.OK


def _only_manifest(p: Path) -> bool:
    return [e.name for e in os.scandir(p)] == [MANIFEST]


def _remove_quiet(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


# -- rearm -----------------------------------------------------------------------------------


def rearm(scope: str) -> int:
    """Restart the safespawn-sync@ path units systemd put in the failed state.

    Only failed ones: a path unit an operator stopped on purpose stays stopped.
    """
    sc = Systemctl(scope)
    failed = sc.list_units("safespawn-sync@*.path", state="failed")
    states = sc.show(failed, ("Result",))
    for unit in failed:
        log.warning("re-arming %s: systemd had stopped it (%s)", unit, states.get(unit, {}).get("Result", "?"))
        sc.run("reset-failed", "--", unit, check=False)
        sc.run("start", "--", unit)
    if not failed:
        log.debug("no failed safespawn-sync@ path unit")
    return ExitCode.OK


# -- command line ----------------------------------------------------------------------------


def _handle(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except InstallError as e:
            print(f"safespawn {args.command}: {e}", file=sys.stderr)
            return ExitCode.FAILED
    return run


def cmd_install(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    scope = args.scope
    channels = args.channels or sorted(cfg.channels)
    if not channels:
        raise InstallError(f"no channels in {cfg.path}: nothing to install")
    return install(cfg, scope=scope, channels=channels,
                   unit_dir=Path(args.unit_dir) if args.unit_dir else default_unit_dir(scope),
                   executable=args.executable or default_executable(),
                   config_file=os.path.abspath(config_path(args.config)), dry_run=args.dry_run)


def cmd_uninstall(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    return uninstall(cfg, scope=args.scope, unit_dir=Path(args.unit_dir) if args.unit_dir else None,
                     stop_sidecars=args.stop_sidecars, dry_run=args.dry_run)


def cmd_rearm(args: argparse.Namespace) -> int:
    return rearm(args.scope)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("install", help="create the channels' directories and install the systemd units",
                       description="Create each channel's directories (inbox writable by the agent, outbox "
                       "read-only to it, host-private state 0700), write the systemd units, reload the "
                       "manager, enable and start them. Idempotent: a second run changes nothing.")
    s.add_argument("--scope", choices=SCOPES, default="system",
                   help="the system manager (production) or the calling user's manager (tests, demos)")
    s.add_argument("--channel", dest="channels", action="extend", nargs="+", metavar="CH",
                   help="only these channels (default: every configured channel)")
    s.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    s.add_argument("--unit-dir", help="where to write the units (default: /etc/systemd/system, or "
                   "$XDG_CONFIG_HOME/systemd/user for --scope user); must be on the manager's search path")
    s.add_argument("--executable", help="absolute path of the safespawn command the units run "
                   "(default: the one running now)")
    s.set_defaults(handler=_handle(cmd_install))

    s = sub.add_parser("uninstall", help="remove the systemd units and the directories install created",
                       description="Disable and remove the units and the directories `install` created. "
                       "Running sidecars (and the state that describes them) are left alone unless "
                       "--stop-sidecars is given.")
    s.add_argument("--scope", choices=SCOPES, default=None, help="default: the scope install used")
    s.add_argument("--stop-sidecars", action="store_true", help="also remove every sidecar of the channels")
    s.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    s.add_argument("--unit-dir", help="default: where install wrote them")
    s.set_defaults(handler=_handle(cmd_uninstall))

    s = sub.add_parser("rearm", help="restart safespawn-sync@ path units that systemd put in the failed state "
                       "(run by safespawn-reconcile.service)")
    s.add_argument("--scope", choices=SCOPES, default="system")
    s.set_defaults(handler=_handle(cmd_rearm))
