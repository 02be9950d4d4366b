"""Each sidecar's conmon leaves the cgroup of the service that ran `podman run`.

podman moves a new container's conmon into a cgroup of its own -- a `libpod-conmon-ID.scope` under
its systemd cgroup manager, `CGROUP_PARENT/conmon` (`/libpod_parent/conmon`) under cgroupfs -- unless
$INVOCATION_ID is set, which systemd sets in every service it starts: then podman assumes the unit
owns the cgroup and leaves conmon in the caller's. Under safespawn's sync service that left every
sidecar's conmon in the service's cgroup, where systemd counts it at each activation ("Found
left-over process ... (conmon)") and would kill it with `KillMode=control-group`. So:

1. `podman_env()`: podman runs without $INVOCATION_ID; podman then moves conmon itself, on cgroup v2
   with either manager, and into every v1 controller hierarchy under cgroupfs.
2. `release()`: on cgroup v1 (hybrid or legacy) with podman's cgroupfs manager, podman's move leaves
   out the hierarchies systemd tracks units with (`name=systemd`, and the unified one in hybrid mode).
   The broker (root) finishes the move there: a conmon still in its own cgroup is written into the
   path podman chose for it in the controllers (ending in `/conmon`), so conmon sits in one place in
   every hierarchy. A process is moved only when it is in this process's own cgroup, is named
   `conmon`, and podman has already moved it in a controller hierarchy; nothing else is touched.

Shell example (what `release` does for one conmon, on the test bed's hybrid v1)::

    grep -E 'memory|name=systemd|^0::' /proc/$CONMON/cgroup    # memory:/libpod_parent/conmon, ...
    mkdir -p /sys/fs/cgroup/systemd/libpod_parent/conmon
    echo $CONMON > /sys/fs/cgroup/systemd/libpod_parent/conmon/cgroup.procs
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# The hierarchies systemd tracks a unit's processes in: the named v1 one, and cgroup v2 (key "").
TRACKING = ("name=systemd", "")


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the broker's, without $INVOCATION_ID (see above)."""
    env = dict(os.environ)
    env.pop("INVOCATION_ID", None)
    return env


def cgroups_of(pid: int | str) -> dict[str, str]:
    """/proc/PID/cgroup as {hierarchy key: path}: the v1 controllers ("memory", "cpu,cpuacct",
    "name=systemd") by their names, cgroup v2 as "". Empty if it cannot be read."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        key, sep, path = rest.partition(":")
        if sep:
            out[key] = path
    return out


def tracking_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, str]:
    """Where the tracking hierarchies are mounted, by key (the first mount of each)."""
    out: dict[str, str] = {}
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3 or fields[3] != "/":  # only a hierarchy mounted from its root
            continue
        fstype, options = after[0], after[2].split(",")
        key = "" if fstype == "cgroup2" else "name=systemd" if fstype == "cgroup" and "name=systemd" in options \
            else None
        if key is not None and key not in out:
            out[key] = fields[4]
    return out


def podman_conmon_path(theirs: dict[str, str], mine: dict[str, str]) -> str | None:
    """The cgroup podman moved a conmon to in the v1 controller hierarchies (its path there ends in
    `/conmon` and differs from ours), or None: podman did not move it (then neither do we)."""
    for key, path in sorted(theirs.items()):
        if key in TRACKING or path == mine.get(key):
            continue
        parts = path.split("/")
        # DENY: anything but a plain absolute path of podman's shape (no "..", no empty part).
        if path.startswith("/") and parts[-1] == "conmon" and all(p not in ("", ".", "..") for p in parts[1:]):
            return path
    return None


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def release(mounts: dict[str, str] | None = None) -> int:
    """Move every conmon left in this process's own cgroup (in the tracking hierarchies) to where
    podman put it in the controllers. Returns how many moves were made; never raises."""
    mine = cgroups_of("self")
    if mounts is None:
        mounts = tracking_mounts()
    moved = 0
    for key in TRACKING:
        here, mount = mine.get(key), mounts.get(key)
        if here is None or mount is None or here == "/":
            continue  # not in that hierarchy, or at its root: nothing is a service's there
        try:
            with open(os.path.join(mount, here.lstrip("/"), "cgroup.procs"), encoding="ascii") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            if pid == str(os.getpid()) or _comm(pid) != "conmon":
                continue
            target = podman_conmon_path(cgroups_of(pid), mine)
            if target is None:
                continue
            where = os.path.join(mount, target.lstrip("/"))
            try:
                os.makedirs(where, exist_ok=True)
                with open(os.path.join(where, "cgroup.procs"), "w", encoding="ascii") as f:
                    f.write(pid)
                moved += 1
            except OSError as e:  # gone meanwhile, or a hierarchy we may not write: it stays
                log.debug("conmon %s stays in %s (%s): %s", pid, here, key or "cgroup2", e)
    return moved
