"""Host configuration: /etc/safespawn/safespawn.toml.

The host decides everything that matters; a request only chooses among what is configured here.

    [broker]
    channels_dir = "/var/lib/safespawn/channels"
    state_dir = "/var/lib/safespawn/state"
    runtime = "podman"            # or "docker" (with docker, docker_host, docker_oci_runtime)

    [channels.neutron-dhcp]
    image = "localhost/example:latest"
    profiles = ["dnsmasq", "haproxy"]
    data_dirs = ["/var/lib/neutron"]
    max_sidecars = 256
    budget_memory = "25%"         # all the channel's sidecars together (broker/budget.py)
    budget_cpus = 1.0             # default: half the host's CPUs, at least 1
    budget_tasks = 4096
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .broker.budget import ChannelBudget, host_cpus, host_memory, parse_size
from .errors import ConfigError

DEFAULT_CONFIG = "/etc/safespawn/safespawn.toml"
CHANNEL_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
RUNTIMES = ("podman", "docker")
DOCKER_HOST_RE = re.compile(r"(unix|tcp|ssh|fd)://[^\s]{1,255}")
OCI_RUNTIME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_BUDGET_MEMORY_PCT = 25
# A budget must leave room for at least one sidecar and its conmon, and at most all of the host.
MIN_BUDGET_MEMORY = 32 << 20
MIN_BUDGET_TASKS = 16
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
# Where channels' sidecar uids come from when a channel names none: [first, count]. 0x7A000000 is
# above the uids of accounts and of user-namespace mappings (/etc/subuid ranges start at 100000,
# systemd's container range ends at 0x6FFFFFFF) and below 2^31 (some tools treat uid_t as signed);
# it stays clear of systemd's "foreign" range at 0x7FFE0000 (docs/security.md, "Sidecar uids").
DEFAULT_SIDECAR_UIDS = (0x7A000000, 0x01000000)
MAX_ID = 4294967294


def allocated_uid(channel: str, uids: tuple[int, int] = DEFAULT_SIDECAR_UIDS) -> int:
    """The uid (and gid) a channel's sidecars get when it configures none: derived from its name
    alone, so it is the same on every host, after every restart and upgrade, whatever other channels
    are configured. Two channels that land on one uid are a configuration error (parse_config)."""
    first, count = uids
    h = int.from_bytes(hashlib.sha256(f"safespawn-sidecar-uid:{channel}".encode()).digest()[:8], "big")
    return first + h % count


@dataclass(frozen=True)
class ChannelConfig:
    name: str
    image: str
    profiles: tuple[str, ...]
    data_dirs: tuple[str, ...] = ()
    max_sidecars: int = 256
    max_requests_per_run: int = 1000
    max_pending: int = 4096
    max_request_bytes: int = 65536
    # Owner of inbox/ on the host: the agent's uid/gid as seen from the host.
    agent_uid: int = 0
    agent_gid: int = 0
    # Host uid/gid the sidecars run as (podman --user, with the profile's capabilities as ambient
    # ones). None: the channel's own uid, allocated from `sidecar_uids` (allocated_uid), never one
    # the host or another channel uses, so per-uid kernel limits (inotify instances, RLIMIT_NPROC)
    # that a sidecar exhausts reach only its own channel. sidecar_gid None: the allocated uid's
    # number when the uid is allocated, else the agent's gid (as before allocation existed).
    # 0 is an explicit, warned opt-in (check-config).
    sidecar_uid: int | None = None
    sidecar_gid: int | None = None
    # [broker] sidecar_uids: the range allocated uids come from (first, count).
    sidecar_uids: tuple[int, int] = DEFAULT_SIDECAR_UIDS
    # Rolling upgrades (broker/rollout.py): when the image or a profile changes, at most this many
    # sidecars are replaced per sync, and a sync replaces the next batch only this long after the last.
    rollout_batch: int = 5
    rollout_pause: int = 30
    # The channel's budget (broker/budget.py): what all its sidecars together may use, whatever
    # max_sidecars times each profile's own limits would come to. Defaults: a quarter of the host's
    # memory (swap included), half its CPUs (at least one), 4096 tasks.
    budget_memory: int = field(default_factory=lambda: DEFAULT_BUDGET_MEMORY_PCT * host_memory() // 100)
    budget_cpus: float = field(default_factory=lambda: max(1.0, host_cpus() / 2))
    budget_tasks: int = 4096

    @property
    def budget(self) -> ChannelBudget:
        return ChannelBudget(self.budget_memory, self.budget_cpus, self.budget_tasks)

    @property
    def sidecar_user(self) -> tuple[int, int]:
        """The host uid:gid this channel's sidecars run as (unless a profile says run_as = "agent")."""
        if self.sidecar_uid is None:
            uid = allocated_uid(self.name, self.sidecar_uids)
            return uid, uid if self.sidecar_gid is None else self.sidecar_gid
        return self.sidecar_uid, self.agent_gid if self.sidecar_gid is None else self.sidecar_gid

    @property
    def sidecar_uid_allocated(self) -> bool:
        return self.sidecar_uid is None


@dataclass(frozen=True)
class BrokerConfig:
    channels_dir: Path = Path("/var/lib/safespawn/channels")
    state_dir: Path = Path("/var/lib/safespawn/state")
    profiles_dir: Path = Path("/etc/safespawn/profiles")
    netns_dir: Path = Path("/run/netns")
    # Which container runtime runs the sidecars: "podman" or "docker" (runtime/docker.py).
    runtime: str = "podman"
    podman: str = "podman"
    docker: str = "docker"
    # The daemon the docker CLI talks to (DOCKER_HOST); empty: the CLI's own default.
    docker_host: str = ""
    # The name under which safespawn-oci-runtime is registered with that dockerd.
    docker_oci_runtime: str = "safespawn"
    parallel_starts: int = 4
    reply_ttl: int = 600
    reconcile_interval: int = 60
    podman_timeout: int = 60  # seconds per runtime CLI call (podman or docker)
    # After starting containers, wait this long before checking they still run: a program that
    # rejects its configuration exits within milliseconds, and the agent should hear why.
    start_settle_ms: int = 200
    # A Prometheus textfile written after each sync (broker/metrics.py); None: no metrics.
    metrics_file: Path | None = None
    # How long the installed sync service waits after serving for the next request, serving it in
    # the same process (`safespawn sync --quick --linger`); 0: it exits at once. At most 30.
    # Only used when sync_resident is false.
    sync_linger: float = 2.0
    # [first, count]: the uids allocated to channels that set no sidecar_uid (allocated_uid).
    sidecar_uids: tuple[int, int] = DEFAULT_SIDECAR_UIDS
    # The installed sync service is a resident broker per channel (`safespawn watch --quick
    # --channel CH`, restarted by systemd, started by its path unit or the timer when none runs);
    # false: a oneshot per activation that lingers sync_linger seconds (docs/operations.md).
    sync_resident: bool = True


@dataclass(frozen=True)
class Config:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    channels: dict[str, ChannelConfig] = field(default_factory=dict)
    path: Path | None = None

    def channel(self, name: str) -> ChannelConfig:
        try:
            return self.channels[name]
        except KeyError:
            raise ConfigError(f"no channel {name!r} in {self.path or 'the configuration'}") from None


# The defaults of a channel's optional keys, stated once in the dataclass.
_CHANNEL = ChannelConfig(name="", image="", profiles=())


def config_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("SAFESPAWN_CONFIG") or DEFAULT_CONFIG)


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in table:
        return default
    v = table.pop(key)
    if isinstance(v, bool) and kind is not bool:
        raise ConfigError(f"{where}.{key}: expected {kind}, got a boolean")
    if not isinstance(v, kind):
        raise ConfigError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def _positive(v: int, where: str) -> int:
    if v < 1:
        raise ConfigError(f"{where}: must be at least 1")
    return v


def _id(v: int | None, where: str) -> int | None:
    if v is not None and not 0 <= v <= 4294967294:
        raise ConfigError(f"{where}: must be a uid/gid from 0 to 4294967294")
    return v


def _nonnegative(v: int, where: str) -> int:
    if v < 0:
        raise ConfigError(f"{where}: must not be negative")
    return v


def _abs_dir(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.startswith("/") or v != os.path.normpath(v) or v == "/":
        raise ConfigError(f"{where}: {v!r} must be a normalized absolute directory other than /")
    return v


def _metrics_file(v: str | None) -> Path | None:
    if v is None:
        return None
    if not v.endswith(".prom"):
        raise ConfigError("broker.metrics_file: node_exporter's textfile collector reads only *.prom files")
    return Path(_abs_dir(v, "broker.metrics_file"))


def _uid_range(v: Any) -> tuple[int, int]:
    where = "broker.sidecar_uids"
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ConfigError(f"{where}: expected [FIRST, COUNT] (two integers)")
    first, count = v
    # DENY: a range reaching uid 0 or the ordinary accounts' uids (< 65536: system and login users,
    # nobody) would hand sidecars a uid some host service runs as.
    if first < 65536 or count < 1 or first + count - 1 > MAX_ID:
        raise ConfigError(f"{where}: FIRST must be at least 65536, COUNT at least 1, and FIRST+COUNT-1 at most "
                          f"{MAX_ID}")
    return first, count


def _check_sidecar_uids(channels: dict[str, ChannelConfig]) -> None:
    """DENY: two channels whose sidecars share a uid share its per-uid kernel limits (inotify
    instances and watches, RLIMIT_NPROC): one channel could exhaust them for the other. Also a
    sidecar uid that is another channel's agent uid. uid 0 is the explicit, warned opt-in."""
    owner: dict[int, str] = {}
    for c in sorted(channels.values(), key=lambda c: c.name):
        uid = c.sidecar_user[0]
        if uid == 0:
            continue
        how = "allocated" if c.sidecar_uid_allocated else "configured"
        if uid in owner:
            raise ConfigError(f"channels.{c.name}: sidecar uid {uid} ({how}) is also channel {owner[uid]}'s; "
                              "every channel needs its own (set sidecar_uid for one of them)")
        owner[uid] = c.name
    for c in channels.values():
        other = owner.get(c.agent_uid)
        if other is not None and other != c.name and c.agent_uid != 0:
            raise ConfigError(f"channels.{other}: sidecar uid {c.agent_uid} is channel {c.name}'s agent_uid; "
                              "every channel needs its own (set sidecar_uid)")


def _parse_channel(name: str, t: dict[str, Any], uids: tuple[int, int] = DEFAULT_SIDECAR_UIDS) -> ChannelConfig:
    where = f"channels.{name}"
    if not CHANNEL_RE.fullmatch(name):
        raise ConfigError(f"{where}: channel names are lowercase letters, digits and '-' (max 31)")
    t = dict(t)
    image = _take(t, "image", str, where, None)
    if image is None or not IMAGE_RE.fullmatch(image):
        raise ConfigError(f"{where}.image: a container image reference is required")
    profiles = _take(t, "profiles", list, where, None)
    if not profiles or not all(isinstance(p, str) for p in profiles):
        raise ConfigError(f"{where}.profiles: a non-empty list of profile names is required")
    data_dirs = tuple(_abs_dir(d, f"{where}.data_dirs") for d in _take(t, "data_dirs", list, where, []))
    c = ChannelConfig(
        name=name,
        image=image,
        profiles=tuple(profiles),
        data_dirs=data_dirs,
        max_sidecars=_positive(_take(t, "max_sidecars", int, where, _CHANNEL.max_sidecars), f"{where}.max_sidecars"),
        max_requests_per_run=_positive(_take(t, "max_requests_per_run", int, where, _CHANNEL.max_requests_per_run),
                                       f"{where}.max_requests_per_run"),
        max_pending=_positive(_take(t, "max_pending", int, where, _CHANNEL.max_pending), f"{where}.max_pending"),
        max_request_bytes=_positive(_take(t, "max_request_bytes", int, where, _CHANNEL.max_request_bytes),
                                    f"{where}.max_request_bytes"),
        agent_uid=_id(_take(t, "agent_uid", int, where, _CHANNEL.agent_uid), f"{where}.agent_uid") or 0,
        agent_gid=_id(_take(t, "agent_gid", int, where, _CHANNEL.agent_gid), f"{where}.agent_gid") or 0,
        sidecar_uid=_id(_take(t, "sidecar_uid", int, where, None), f"{where}.sidecar_uid"),
        sidecar_gid=_id(_take(t, "sidecar_gid", int, where, None), f"{where}.sidecar_gid"),
        rollout_batch=_positive(_take(t, "rollout_batch", int, where, _CHANNEL.rollout_batch),
                                f"{where}.rollout_batch"),
        rollout_pause=_nonnegative(_take(t, "rollout_pause", int, where, _CHANNEL.rollout_pause),
                                   f"{where}.rollout_pause"),
        sidecar_uids=uids,
    )
    c = _parse_budget(c, t, where)
    if t:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(t))}")
    return c


def _parse_budget(c: ChannelConfig, t: dict[str, Any], where: str) -> ChannelConfig:
    """budget_memory ("2g", "25%" of the host, bytes), budget_cpus (CPUs, or "50%" of the host's),
    budget_tasks: checked here, so a typo never leaves a channel unbounded."""
    total, cpus = host_memory(), host_cpus()
    changes: dict[str, Any] = {}
    if "budget_memory" in t:
        v = t.pop("budget_memory")
        try:
            mem = parse_size(v, total)
        except ValueError as e:
            raise ConfigError(f"{where}.budget_memory: {e}") from None
        if mem < MIN_BUDGET_MEMORY or (total and mem > total):
            raise ConfigError(f"{where}.budget_memory: {mem} bytes is below 32m or above the host's memory")
        changes["budget_memory"] = mem
    if "budget_cpus" in t:
        v = t.pop("budget_cpus")
        try:
            if isinstance(v, str) and v.strip().endswith("%"):
                n = float(v.strip()[:-1]) * cpus / 100
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                n = float(v)
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{where}.budget_cpus: a number of CPUs (0.5) or a share of the host's (\"50%\")") \
                from None
        if not 0.01 <= n <= cpus:
            raise ConfigError(f"{where}.budget_cpus: {n:g} is not between 0.01 and the host's {cpus} CPUs")
        changes["budget_cpus"] = round(n, 2)
    if "budget_tasks" in t:
        n = _take(t, "budget_tasks", int, where, 0)
        if not MIN_BUDGET_TASKS <= n <= 4194304:
            raise ConfigError(f"{where}.budget_tasks: from {MIN_BUDGET_TASKS} to 4194304")
        changes["budget_tasks"] = n
    return replace(c, **changes) if changes else c


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    data = dict(data)
    b = dict(data.pop("broker", {}))
    where = "broker"
    d = BrokerConfig()  # the defaults, stated once in the dataclass

    def directory(key: str, default: Path) -> Path:
        return Path(_abs_dir(_take(b, key, str, where, str(default)), f"broker.{key}"))

    def positive(key: str, default: int) -> int:
        return _positive(_take(b, key, int, where, default), f"broker.{key}")

    broker = BrokerConfig(
        channels_dir=directory("channels_dir", d.channels_dir),
        state_dir=directory("state_dir", d.state_dir),
        profiles_dir=directory("profiles_dir", d.profiles_dir),
        netns_dir=directory("netns_dir", d.netns_dir),
        runtime=_take(b, "runtime", str, where, d.runtime),
        podman=_take(b, "podman", str, where, d.podman),
        docker=_take(b, "docker", str, where, d.docker),
        docker_host=_take(b, "docker_host", str, where, d.docker_host),
        docker_oci_runtime=_take(b, "docker_oci_runtime", str, where, d.docker_oci_runtime),
        parallel_starts=positive("parallel_starts", d.parallel_starts),
        reply_ttl=positive("reply_ttl", d.reply_ttl),
        reconcile_interval=positive("reconcile_interval", d.reconcile_interval),
        podman_timeout=positive("podman_timeout", d.podman_timeout),
        start_settle_ms=_take(b, "start_settle_ms", int, where, d.start_settle_ms),
        metrics_file=_metrics_file(_take(b, "metrics_file", str, where, None)),
        sync_linger=float(_take(b, "sync_linger", (int, float), where, d.sync_linger)),
        sidecar_uids=_uid_range(_take(b, "sidecar_uids", list, where, list(d.sidecar_uids))),
        sync_resident=_take(b, "sync_resident", bool, where, d.sync_resident),
    )
    if not 0 <= broker.sync_linger <= 30:
        raise ConfigError("broker.sync_linger: seconds, from 0 to 30")
    if broker.runtime not in RUNTIMES:
        raise ConfigError(f"broker.runtime: {broker.runtime[:40]!r} is not one of {', '.join(RUNTIMES)}")
    if broker.docker_host and not DOCKER_HOST_RE.fullmatch(broker.docker_host):
        raise ConfigError("broker.docker_host: expected unix:///PATH, tcp://HOST:PORT, ssh://... or fd://")
    if not OCI_RUNTIME_RE.fullmatch(broker.docker_oci_runtime):
        raise ConfigError("broker.docker_oci_runtime: letters, digits, '_', '.', '-' (max 64)")
    if b:
        raise ConfigError(f"broker: unknown keys {', '.join(sorted(b))}")
    channels_t = data.pop("channels", {})
    if not isinstance(channels_t, dict):
        raise ConfigError("channels: expected a table of channels")
    channels = {}
    for name, t in channels_t.items():
        if not isinstance(t, dict):
            raise ConfigError(f"channels.{name}: expected a table")
        channels[name] = _parse_channel(name, t, broker.sidecar_uids)
    _check_sidecar_uids(channels)
    if data:
        raise ConfigError(f"unknown top-level keys {', '.join(sorted(data))}")
    return Config(broker=broker, channels=channels, path=path)


def _ids_in(path: str, field_: int) -> set[int]:
    """The numeric ids in field `field_` of a colon-separated account file (passwd, group)."""
    out: set[int] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > field_ and parts[field_].strip().isdigit():
                    out.add(int(parts[field_]))
    except OSError:
        pass
    return out


def _ranges_in(path: str) -> list[tuple[int, int, str]]:
    """(first, count, owner) of each NAME:FIRST:COUNT line of /etc/subuid or /etc/subgid."""
    out: list[tuple[int, int, str]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    out.append((int(parts[1]), int(parts[2]), parts[0][:32]))
    except OSError:
        pass
    return out


def host_id_conflicts(config: Config, etc: str = "/etc") -> list[tuple[ChannelConfig, str]]:
    """Channels whose sidecar uid or gid is one this host already gives out: an account in passwd or
    group, or an id inside a subordinate range of /etc/subuid or /etc/subgid (podman's user
    namespaces). Such a sidecar would share that account's per-uid kernel limits and files.
    uid 0 is not listed here (check-config warns about it on its own)."""
    uids, gids = _ids_in(f"{etc}/passwd", 2), _ids_in(f"{etc}/group", 2)
    subuid, subgid = _ranges_in(f"{etc}/subuid"), _ranges_in(f"{etc}/subgid")
    out: list[tuple[ChannelConfig, str]] = []
    for c in sorted(config.channels.values(), key=lambda c: c.name):
        uid, gid = c.sidecar_user
        if uid == 0:
            continue
        why = []
        if uid in uids:
            why.append(f"uid {uid} is an account in {etc}/passwd")
        if gid in gids and gid != c.agent_gid:
            why.append(f"gid {gid} is a group in {etc}/group")
        why += [f"uid {uid} is in {owner}'s range {first}-{first + n - 1} in {etc}/subuid"
                for first, n, owner in subuid if first <= uid < first + n]
        why += [f"gid {gid} is in {owner}'s range {first}-{first + n - 1} in {etc}/subgid"
                for first, n, owner in subgid if first <= gid < first + n]
        if why:
            out.append((c, "; ".join(why)))
    return out


def load_config(explicit: str | None = None) -> Config:
    path = config_path(explicit)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse_config(data, path)
