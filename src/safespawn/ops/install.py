"""`safespawn install` and `safespawn uninstall`: lay out the channels, put the units in place.

`install` is idempotent (a second run changes nothing and says so) and records what it created in
`state_dir/install.json` (the `Manifest`), so `uninstall` removes exactly that. The unit text and
systemctl live in units.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..broker.files import atomic_write, open_dir
from ..broker.inbox import ChannelDir, channel_layout, create_channel_dirs
from ..broker.state import ChannelState
from ..config import Config
from ..errors import ExitCode, InstallError, RuntimeFailed
from .units import (
    MARKER,
    RECONCILE_TIMER,
    SYNC_PATH,
    SYNC_SERVICE,
    UNIT_NAMES,
    Systemctl,
    default_unit_dir,
    path_unit,
    render_units,
    sync_service,
)

MANIFEST = "install.json"


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
        base = Path(ChannelDir.path_of(b.channels_dir, ch))
        if _channel_dirs(base, c.agent_uid, c.agent_gid, report):
            _add(manifest.dirs, str(base))
        state = ChannelState.of(b.state_dir, ch)
        _add(manifest.dirs, *_private_dir(Path(state.path), report))
        _private_dir(Path(state.quarantine_path), report)
        _add(manifest.channels, ch)

    # 2. unit files.
    if not unit_dir.is_dir():
        _makedirs(unit_dir, 0o755, report)
    changed = {name for name, text in units.items() if _write_unit(unit_dir, name, text, report)}
    _add(manifest.units, *units)

    # 3. the manager: reload, enable, start (restart what changed, re-arm what failed). What was
    # created is recorded even if systemctl fails below, so that uninstall can still remove it.
    try:
        _activate(channels, changed, scope, report, resident=cfg.broker.sync_resident)
    finally:
        if report.changes and not dry_run:
            manifest.save(b.state_dir)
    report.summary()
    return ExitCode.OK


def _activate(channels: list[str], changed: set[str], scope: str, report: Report, resident: bool = False) -> None:
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
    if resident:
        # The resident brokers run from now on (they keep pid files true after a runtime restart),
        # not only from the first request; one whose unit file changed runs the new one.
        brokers = [sync_service(ch) for ch in channels]
        try:
            running = sc.show(brokers, ("ActiveState",))
        except InstallError:
            if not dry_run:
                raise
            running = {}
        for u in brokers:
            active = running.get(u, {}).get("ActiveState", "inactive")
            if active in ("active", "activating", "reloading"):
                if SYNC_SERVICE in changed and report.change(f"restart {u} (its unit file changed)"):
                    sc.run("restart", "--no-block", "--", u)
            elif report.change(f"start {u}"):
                if active == "failed":
                    sc.run("reset-failed", "--", u)
                sc.run("start", "--no-block", "--", u)


# -- uninstall -------------------------------------------------------------------------------


def _stop_sidecars(cfg: Config, channel: str, report: Report) -> int:
    from ..runtime import make_runtime

    runtime = make_runtime(cfg.broker)
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
                from ..runtime import make_runtime

                n = len(make_runtime(b).list(ch))
            except RuntimeFailed:
                n = 0
            if n:
                report.note(f"left {n} sidecar(s) of channel {ch} running, and their state in "
                            f"{ChannelState.path_of(b.state_dir, ch)}; `safespawn uninstall --stop-sidecars` "
                            "removes both")

    # 4. directories install created, children first; host-private state only with the sidecars.
    # The cgroup manager note is a cache of the host's facts, not a channel's state: it goes either way.
    cache = b.state_dir / CGROUP_HOST_CACHE
    if os.path.lexists(cache) and report.change(f"remove {cache}"):
        _remove_quiet(cache)
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
                _remove_quiet(p / CGROUP_HOST_CACHE)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not dry_run:
        if remaining and os.path.isdir(b.state_dir):
            Manifest(scope=scope, unit_dir=str(unit_dir), dirs=remaining, channels=channels).save(b.state_dir)
        else:
            _remove_quiet(b.state_dir / MANIFEST)
    report.summary()
    return ExitCode.FAILED if failed else ExitCode.OK


CGROUP_HOST_CACHE = "cgroup-host.json"  # budget.cached_detect's note, remade on demand


def _only_manifest(p: Path) -> bool:
    return {e.name for e in os.scandir(p)} <= {MANIFEST, CGROUP_HOST_CACHE}


def _remove_quiet(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
