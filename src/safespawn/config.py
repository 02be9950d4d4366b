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
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG = "/etc/safespawn/safespawn.toml"
CHANNEL_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
RUNTIMES = ("podman", "docker")
DOCKER_HOST_RE = re.compile(r"(unix|tcp|ssh|fd)://[^\s]{1,255}")
OCI_RUNTIME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")


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
    # ones); None = the agent's. The sidecar must be able to read what the agent writes in the data
    # dirs and write leases/state files there: the agent's own uid needs no extra ownership.
    sidecar_uid: int | None = None
    sidecar_gid: int | None = None
    # Rolling upgrades (safespawn.rollout): when the image or a profile changes, at most this many
    # sidecars are replaced per sync, and a sync replaces the next batch only this long after the last.
    rollout_batch: int = 5
    rollout_pause: int = 30

    @property
    def sidecar_user(self) -> tuple[int, int]:
        uid = self.agent_uid if self.sidecar_uid is None else self.sidecar_uid
        gid = self.agent_gid if self.sidecar_gid is None else self.sidecar_gid
        return uid, gid


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
    # A Prometheus textfile written after each sync (safespawn.metrics); None: no metrics.
    metrics_file: Path | None = None
    # How long the installed sync service waits after serving for the next request, serving it in
    # the same process (`safespawn sync --quick --linger`); 0: it exits at once. At most 30.
    # Only used when sync_resident is false.
    sync_linger: float = 2.0
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


def _parse_channel(name: str, t: dict[str, Any]) -> ChannelConfig:
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
        agent_uid=_take(t, "agent_uid", int, where, _CHANNEL.agent_uid),
        agent_gid=_take(t, "agent_gid", int, where, _CHANNEL.agent_gid),
        sidecar_uid=_id(_take(t, "sidecar_uid", int, where, None), f"{where}.sidecar_uid"),
        sidecar_gid=_id(_take(t, "sidecar_gid", int, where, None), f"{where}.sidecar_gid"),
        rollout_batch=_positive(_take(t, "rollout_batch", int, where, _CHANNEL.rollout_batch),
                                f"{where}.rollout_batch"),
        rollout_pause=_nonnegative(_take(t, "rollout_pause", int, where, _CHANNEL.rollout_pause),
                                   f"{where}.rollout_pause"),
    )
    if t:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(t))}")
    return c


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
        channels[name] = _parse_channel(name, t)
    if data:
        raise ConfigError(f"unknown top-level keys {', '.join(sorted(data))}")
    return Config(broker=broker, channels=channels, path=path)


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
