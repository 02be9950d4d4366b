"""A channel's budget: one parent cgroup per channel bounds all its sidecars together.

Each sidecar has its own limits (its profile's `memory`, `cpus`, `pids_limit`); the channel's
budget bounds their sum, whatever `max_sidecars` says, so that an agent that fills its channel
with sidecars cannot take more of the host than the operator gave that channel. The budget is a
parent cgroup the runtime puts every sidecar of the channel under (`--cgroup-parent`):

- podman's cgroupfs manager: the broker makes `/safespawn/CHANNEL` itself and writes its limits:
  on cgroup v1 in the memory, cpu and pids hierarchies (`memory.limit_in_bytes` and
  `memory.memsw.limit_in_bytes`, `cpu.cfs_quota_us`, `pids.max`), on cgroup v2 in the unified
  one (`memory.max`, `memory.swap.max` = 0, `cpu.max`, `pids.max`).
- podman's systemd manager (the default on systemd hosts): a slice per channel,
  `safespawn-CHANNEL.slice`, below `safespawn.slice`. systemd reads '-' in a slice name as a
  level of the hierarchy (`a-b.slice` is inside `a.slice`), so the channel's own '-' are written
  as '_' (channel names never hold '_': the mapping is one to one); without that, channel `a`'s
  slice would contain channel `a-b`'s. The broker sets `MemoryMax=`, `MemorySwapMax=0`,
  `CPUQuota=` and `TasksMax=` with `systemctl set-property --runtime` and starts the slice.

    budget.ensure(host, "neutron-dhcp", ChannelBudget(2 << 30, 1.0, 4096))
    # -> "/safespawn/neutron-dhcp"  (cgroupfs)  or  "safespawn-neutron_dhcp.slice"  (systemd)

The limits are written before every sidecar start of a sync (a few small files, compared first),
so a changed budget takes effect at the next start without replacing any sidecar; `status` and the
metrics read the same files to show what the channel uses against its budget.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RuntimeFailed

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
TOP = "safespawn"  # /safespawn/CH on cgroupfs, safespawn.slice/safespawn-CH.slice on systemd
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class ChannelBudget:
    """What all of one channel's sidecars may use together (their conmon processes included)."""

    memory: int  # bytes, swap included
    cpus: float  # CPUs' worth of time per period
    tasks: int  # processes and threads


@dataclass(frozen=True)
class CgroupHost:
    """How the container runtime manages cgroups here: podman's `host.cgroupManager` and
    `host.cgroupVersion`."""

    manager: str  # "cgroupfs" | "systemd"
    version: int  # 1 | 2
    root: Path = CGROUP_ROOT


_CONTAINERS_CONF = ("/usr/share/containers/containers.conf", "/etc/containers/containers.conf",
                    "/etc/containers/containers.conf.d")


def _detect_key(podman: str) -> str:
    """What podman's answer depends on: this boot, the podman binary, its containers.conf files."""
    parts = [_read(Path("/proc/sys/kernel/random/boot_id")), os.environ.get("CONTAINERS_CONF", "")]
    for path in (shutil.which(podman) or podman, *_CONTAINERS_CONF, os.environ.get("CONTAINERS_CONF", "")):
        try:
            st = os.stat(path)
            parts.append(f"{path}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{path}:-")
    return "|".join(parts)


def cached_detect(podman: str, cache_dir: str | None, ask: Callable[[], CgroupHost]) -> CgroupHost:
    """What `ask` says podman's cgroup manager is (runtime/podman.py, `cgroup_host_of`: `podman info`),
    remembered in `cache_dir/cgroup-host.json` (the broker's private state dir) until the boot, the
    podman binary or a containers.conf changes: `podman info` costs about 0.3 s, and each
    short-lived sync process that starts a sidecar would pay it."""
    if cache_dir is None:
        return ask()
    path = os.path.join(cache_dir, "cgroup-host.json")
    key = _detect_key(podman)
    try:
        with open(path, "rb") as f:
            d = json.load(f)
        if d.get("key") == key and d.get("manager") in ("cgroupfs", "systemd") and d.get("version") in (1, 2):
            return CgroupHost(str(d["manager"]), int(d["version"]))
    except (OSError, ValueError, AttributeError):
        pass
    host = ask()
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "manager": host.manager, "version": host.version}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot remember podman's cgroup manager in %s: %s", path, e)
    return host


def slice_name(channel: str) -> str:
    """The channel's systemd slice: '-' (systemd's level separator) written as '_'."""
    return f"{TOP}-{channel.replace('-', '_')}.slice"


def parent(host: CgroupHost, channel: str) -> str:
    """The value of the runtime's `--cgroup-parent` for the channel's sidecars."""
    if host.manager == "systemd":
        return slice_name(channel)
    return f"/{TOP}/{channel}"


def cgroup_dirs(host: CgroupHost, channel: str) -> dict[str, Path]:
    """controller ("memory", "cpu", "pids"; "" for the unified hierarchy) -> the channel's cgroup dir."""
    if host.manager == "systemd":
        if host.version == 1:
            return {c: host.root / c / f"{TOP}.slice" / slice_name(channel) for c in V1_CONTROLLERS}
        return {"": host.root / f"{TOP}.slice" / slice_name(channel)}
    if host.version == 2:
        return {"": host.root / TOP / channel}
    return {c: host.root / c / TOP / channel for c in V1_CONTROLLERS}


def ensure(host: CgroupHost, channel: str, budget: ChannelBudget, systemctl: str = "systemctl") -> str:
    """Make the channel's parent cgroup (or slice) exist with `budget`'s limits; its `--cgroup-parent`.
    Raises RuntimeFailed when that cannot be done: a sidecar is then not started unbounded."""
    if host.manager == "systemd":
        _ensure_slice(host, channel, budget, systemctl)
    elif host.version == 2:
        _ensure_v2(host, channel, budget)
    else:
        _ensure_v1(host, channel, budget)
    return parent(host, channel)


def _mkdirs(base: Path, parts: list[str]) -> Path:
    """mkdir each level below `base` (a cgroup filesystem: no links to follow, but check anyway)."""
    d = base
    for part in parts:
        d = d / part
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            pass
        if not d.is_dir() or d.is_symlink():
            raise RuntimeFailed(f"{d} is not a cgroup directory")
    return d


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    if _read(path) == value:
        return
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise RuntimeFailed(f"cannot write {value!r} to {path}: {e.strerror}") from None


def _ensure_v1(host: CgroupHost, channel: str, b: ChannelBudget) -> None:
    dirs = {c: _mkdirs(host.root / c, [TOP, channel]) for c in V1_CONTROLLERS}
    mem = dirs["memory"]
    limit, memsw = mem / "memory.limit_in_bytes", mem / "memory.memsw.limit_in_bytes"
    value = str(b.memory)
    if memsw.exists():
        # memsw (memory + swap) may never be below the memory limit: raise memsw first when
        # growing, lower the memory limit first when shrinking.
        try:
            _write(limit, value)
            _write(memsw, value)
        except RuntimeFailed:
            _write(memsw, value)
            _write(limit, value)
    else:
        # No swap accounting (swapaccount=0): swap is then not bounded by the budget.
        log.warning("%s has no memory.memsw.limit_in_bytes: the budget bounds memory, not swap", mem)
        _write(limit, value)
    _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
    _write(dirs["cpu"] / "cpu.cfs_quota_us", str(max(1000, round(b.cpus * CPU_PERIOD_US))))
    _write(dirs["pids"] / "pids.max", str(b.tasks))


def _enable_controllers(d: Path) -> None:
    wanted = {"memory", "cpu", "pids"}
    have = set(_read(d / "cgroup.subtree_control").split())
    if wanted - have:
        try:
            with open(d / "cgroup.subtree_control", "w") as f:
                f.write(" ".join(f"+{c}" for c in sorted(wanted - have)))
        except OSError as e:
            raise RuntimeFailed(f"cannot enable {sorted(wanted - have)} in {d}: {e.strerror}") from None


def _ensure_v2(host: CgroupHost, channel: str, b: ChannelBudget) -> None:
    _enable_controllers(host.root)
    top = _mkdirs(host.root, [TOP])
    _enable_controllers(top)
    d = _mkdirs(top, [channel])
    _write(d / "memory.max", str(b.memory))
    _write(d / "memory.swap.max", "0")
    _write(d / "cpu.max", f"{max(1000, round(b.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
    _write(d / "pids.max", str(b.tasks))
    _enable_controllers(d)


def slice_properties(b: ChannelBudget, version: int = 2) -> list[str]:
    """systemd's names for the budget (`systemctl set-property`, or a slice unit's [Slice]). On a
    cgroup v1 host systemd has MemoryLimit= and no swap setting: the slice then bounds memory, and
    each sidecar's own --memory-swap its swap."""
    memory = [f"MemoryMax={b.memory}", "MemorySwapMax=0"] if version == 2 else [f"MemoryLimit={b.memory}"]
    return [*memory, f"CPUQuota={round(b.cpus * 100)}%", f"TasksMax={b.tasks}"]


def _slice_matches(host: CgroupHost, channel: str, b: ChannelBudget) -> bool:
    dirs = cgroup_dirs(host, channel)
    quota_us = round(b.cpus * 100) * CPU_PERIOD_US // 100
    if host.version == 1:
        return (_read(dirs["memory"] / "memory.limit_in_bytes") == str(b.memory)
                and _read(dirs["pids"] / "pids.max") == str(b.tasks)
                and _read(dirs["cpu"] / "cpu.cfs_quota_us") == str(quota_us))
    d = dirs[""]
    quota = _read(d / "cpu.max").split()
    return (_read(d / "memory.max") == str(b.memory) and _read(d / "memory.swap.max") == "0"
            and _read(d / "pids.max") == str(b.tasks)
            and quota == [str(quota_us), str(CPU_PERIOD_US)])


def _ensure_slice(host: CgroupHost, channel: str, b: ChannelBudget, systemctl: str) -> None:
    if _slice_matches(host, channel, b):
        return  # the common case: no systemctl call
    name = slice_name(channel)
    for argv in ([systemctl, "set-property", "--runtime", name, *slice_properties(b, host.version)],
                 [systemctl, "start", name]):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                               stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeFailed(f"cannot run {argv[0]}: {e}") from None
        if p.returncode != 0:
            raise RuntimeFailed(f"systemctl {argv[1]} {name} failed (rc {p.returncode}): "
                                f"{p.stderr.strip()[-300:]}")


def remove(host: CgroupHost, channel: str) -> bool:
    """Remove the channel's cgroups once no sidecar is left: bottom-up, in every hierarchy the
    runtime made them in (with cgroup v1 podman makes the parent in each controller, and a
    `conmon` cgroup below it); a busy cgroup stays (conmon may outlive `podman rm` briefly).
    True when none is left."""
    if host.manager == "systemd":
        return True  # systemd removes an empty slice's cgroup when the slice stops
    if host.version == 2:
        tops = [host.root / TOP / channel]
    else:
        try:
            tops = [host.root / h / TOP / channel for h in sorted(os.listdir(host.root))]
        except OSError:
            return False
    left = False
    for top in tops:
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError as e:
                left = left or e.errno != errno.ENOENT
                if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove %s: %s", dirpath, e.strerror)
    return not left


@dataclass(frozen=True)
class BudgetUse:
    """What a channel's sidecars use now, against the budget as the cgroup holds it."""

    memory: int
    memory_max: int | None
    tasks: int
    tasks_max: int | None
    cpu_seconds: float  # CPU time used since the cgroup was made
    cpus_max: float | None
    throttled_seconds: float  # time the sidecars wanted CPU beyond the budget

    def as_dict(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory, "memory_max_bytes": self.memory_max, "tasks": self.tasks,
                "tasks_max": self.tasks_max, "cpu_seconds": round(self.cpu_seconds, 3),
                "cpus_max": self.cpus_max, "cpu_throttled_seconds": round(self.throttled_seconds, 3)}


def locate(channel: str, root: Path = CGROUP_ROOT) -> CgroupHost | None:
    """Where the channel's budget cgroup is, found by looking (no runtime call): for `status` and
    the metrics, which must not ask podman. None: no sidecar of the channel was started yet."""
    if (root / f"{TOP}.slice" / slice_name(channel)).is_dir():
        return CgroupHost("systemd", 2, root)
    if (root / "memory" / f"{TOP}.slice" / slice_name(channel)).is_dir():
        return CgroupHost("systemd", 1, root)
    if (root / "memory" / TOP / channel).is_dir():
        return CgroupHost("cgroupfs", 1, root)
    if (root / TOP / channel / "cgroup.controllers").exists():
        return CgroupHost("cgroupfs", 2, root)
    return None


def use_of(channel: str, root: Path = CGROUP_ROOT) -> BudgetUse | None:
    host = locate(channel, root)
    return use(host, channel) if host is not None else None


def _int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None  # "max", or absent


def _stat(path: Path) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def use(host: CgroupHost, channel: str) -> BudgetUse | None:
    """The channel's use now; None when its cgroup does not exist (no sidecar started yet)."""
    dirs = cgroup_dirs(host, channel)
    if "" in dirs:
        d = dirs[""]
        if not d.is_dir():
            return None
        quota = _read(d / "cpu.max").split()
        cpus = int(quota[0]) / int(quota[1]) if len(quota) == 2 and quota[0].isdigit() else None
        st = _stat(d / "cpu.stat")
        return BudgetUse(_int(_read(d / "memory.current")) or 0, _int(_read(d / "memory.max")),
                         _int(_read(d / "pids.current")) or 0, _int(_read(d / "pids.max")),
                         st.get("usage_usec", 0) / 1e6, cpus, st.get("throttled_usec", 0) / 1e6)
    if not dirs["memory"].is_dir():
        return None
    mem = dirs["memory"]
    usage = _int(_read(mem / "memory.memsw.usage_in_bytes")) or _int(_read(mem / "memory.usage_in_bytes")) or 0
    limit = _int(_read(mem / "memory.limit_in_bytes"))
    quota_us = _int(_read(dirs["cpu"] / "cpu.cfs_quota_us"))
    period_us = _int(_read(dirs["cpu"] / "cpu.cfs_period_us")) or CPU_PERIOD_US
    cpuacct = host.root / "cpuacct" / TOP / channel / "cpuacct.usage"
    st = _stat(dirs["cpu"] / "cpu.stat")
    return BudgetUse(usage, limit, _int(_read(dirs["pids"] / "pids.current")) or 0,
                     _int(_read(dirs["pids"] / "pids.max")), (_int(_read(cpuacct)) or 0) / 1e9,
                     quota_us / period_us if quota_us and quota_us > 0 else None,
                     st.get("throttled_time", 0) / 1e9)


# -- sizes in the configuration and the profiles ------------------------------------------------

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: Any, host_total: int | None = None) -> int:
    """Bytes from 1234, "64m", "2g", "512k", or (with `host_total`) "25%" of it. ValueError if not."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size like \"64m\", got {type(value).__name__}")
    s = value.strip().lower()
    if s.endswith("%") and host_total is not None:
        pct = float(s[:-1])
        if not 0 < pct <= 100:
            raise ValueError("a percentage from 0 to 100")
        return int(host_total * pct / 100)
    s = s.removesuffix("b").removesuffix("i")
    unit = s[-1:] if s[-1:] in _UNITS and s[-1:] else ""
    number = s[:-1] if unit else s
    if not number.isdigit():
        raise ValueError(f"{value[:20]!r} is not a size like \"64m\"")
    return int(number) * _UNITS[unit]


def host_memory() -> int:
    """MemTotal in bytes (/proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def host_cpus() -> int:
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1
