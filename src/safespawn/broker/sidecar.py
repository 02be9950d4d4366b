"""What a sidecar is: the container spec the policy builds and the runtime runs, and the container
the runtime reports back.

A sidecar is identified by (channel, profile, key): the key is the netns name, or a value the
profile extracts from argv when it runs without a netns. Its container name and labels are derived
by the host from those alone, so a channel can only ever name its own sidecars.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from functools import cached_property

LABEL_CHANNEL = "safespawn.channel"
LABEL_PROFILE = "safespawn.profile"
LABEL_KEY = "safespawn.key"
LABEL_NETNS = "safespawn.netns"
LABEL_SPEC = "safespawn.spec"


def sidecar_name(channel: str, profile: str, key: str) -> str:
    return f"{channel}-{profile}-{key}"


def sidecar_key(name: str, channel: str, profile: str) -> str:
    """The key of a sidecar named by `sidecar_name(channel, profile, key)`."""
    return name[len(channel) + len(profile) + 2:]


@dataclass(frozen=True)
class SidecarSpec:
    """Everything the runtime needs to run one sidecar; built by the policy, never by a request."""

    name: str
    channel: str
    profile: str
    key: str
    netns: str | None
    netns_path: str | None
    image: str
    entrypoint: tuple[str, ...]  # the profile's fixed command prefix
    args: tuple[str, ...]  # the request's checked arguments, after the image
    capabilities: tuple[str, ...]
    mounts: tuple[str, ...]
    tmpfs: tuple[str, ...]
    pid_host: bool
    read_only: bool
    stop_grace: int
    # podman restarts a failed sidecar at once, this many times, before the broker respawns it with
    # backoff: a crash-looping sidecar costs at most 1 + restart_retries starts per respawn.
    restart_retries: int = 3
    pids_limit: int = 256
    # The profile's own limits (docs/security.md, "Resource exhaustion"): memory with swap
    # included (bytes), CPUs, and how much the kernel's OOM killer prefers this sidecar's
    # processes over the host's (0..1000). The channel's budget bounds all sidecars together.
    memory: int = 128 << 20
    cpus: float = 0.5
    oom_score_adj: int = 500
    # (path the agent named, "main" | "child"): pid files the host writes with host pids.
    pid_files: tuple[tuple[str, str], ...] = ()
    user: str = "0:0"  # host uid:gid the program runs as (--user)
    # Files the program writes (the profile's writable_files), handed to `user` by the host before
    # each start (pidfiles.hand_over_file); empty when the sidecar runs as uid 0.
    writable_files: tuple[str, ...] = ()

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid)

    @cached_property
    def spec_hash(self) -> str:
        """A digest of the full spec: a running container whose label differs is replaced.
        (The fields are flat values and tuples: json gives the same bytes as for `asdict`.)"""
        fields_ = {f.name: getattr(self, f.name) for f in fields(self)}
        blob = json.dumps(fields_, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_CHANNEL: self.channel,
            LABEL_PROFILE: self.profile,
            LABEL_KEY: self.key,
            LABEL_NETNS: self.netns or "",
            LABEL_SPEC: self.spec_hash,
        }


@dataclass(frozen=True)
class Container:
    """A container as the runtime lists it. Defined here, beside the spec, so that the policy (which
    judges requests against the channel's containers) needs nothing from the runtime package."""

    id: str
    name: str
    state: str  # podman's words: running, exited, created, stopped, paused, ...
    pid: int
    labels: dict[str, str] = field(default_factory=dict)
    started: int = 0  # unix seconds
    exit_code: int = 0
    exited_at: int = 0  # unix seconds of its last exit; 0 if it never exited (or not known)
    restarts: int = 0  # restarts by the runtime's own restart policy (known from inspect only)
    image: str = ""  # the image reference it was created from (a rollback returns to it)

    @property
    def running(self) -> bool:
        return self.state == "running" and self.pid > 0

    @property
    def spec_hash(self) -> str:
        return self.labels.get(LABEL_SPEC, "")
