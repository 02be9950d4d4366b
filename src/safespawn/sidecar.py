"""What a sidecar is: the container spec the policy builds and the runtime runs.

A sidecar is identified by (channel, profile, key): the key is the netns name, or a value the
profile extracts from argv when it runs without a netns. Its container name and labels are derived
by the host from those alone, so a channel can only ever name its own sidecars.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
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
    restart_retries: int = 5
    pids_limit: int = 256
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
