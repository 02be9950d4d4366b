"""`safespawn wrappers install`: write the agent side into an agent's wrappers directory.

    safespawn wrappers install --channel neutron-dhcp /var/lib/safespawn/wrappers/neutron-dhcp

writes the files agent/scripts.py renders or copies (the client, a wrapper per program Neutron
starts, a kill script per Neutron service, the safespawn-neutron launcher with its hook and the
ProcessManager class): put the directory ahead of the real binaries in the agent's PATH, and ``ip
netns exec NS dnsmasq ARGS`` becomes a start request on the channel; point ``[AGENT]
kill_scripts_path`` at it, and ``dnsmasq-kill HUP PID`` becomes a signal request.

Every file is tiny and generated from the channel directory alone; running the command again
rewrites the same bytes (idempotent). The files run inside the agent image, never on the host; this
module runs as root and writes them through directory fds, never through a symlink.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..agent.scripts import DEFAULT_PYTHON, HOOK_DIR, KILL_SCRIPTS, PROGRAMS, agent_files
from ..broker.files import atomic_write, open_dir
from ..broker.inbox import ChannelDir

__all__ = ["DEFAULT_PYTHON", "KILL_SCRIPTS", "PROGRAMS", "default_channel_dir", "install"]


def _write(target_fd: int, name: str, text: str, mode: int) -> bool:
    """Write `name` (a file, or SUBDIR/file) atomically (a reader never sees half a script), never
    through a symlink; return whether anything changed."""
    data = text.encode()
    sub, _, base = name.rpartition("/")
    dir_fd = open_dir(sub, target_fd) if sub else target_fd
    try:
        try:
            fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                if f.read() == data and (os.fstat(f.fileno()).st_mode & 0o7777) == mode:
                    return False
        except OSError:
            pass
        atomic_write(dir_fd, base, data, mode=mode)
        return True
    finally:
        if sub:
            os.close(dir_fd)


def install(target: str, channel: str, channel_dir: str, python: str = DEFAULT_PYTHON) -> list[str]:
    """Write the agent side (agent/scripts.py) into `target`; return the files changed."""
    os.makedirs(target, mode=0o755, exist_ok=True)
    changed = []
    files = agent_files(channel, channel_dir, python)
    os.makedirs(os.path.join(target, HOOK_DIR), mode=0o755, exist_ok=True)
    target_fd = open_dir(target)
    try:
        for name, (text, mode) in files.items():
            if _write(target_fd, name, text, mode):
                changed.append(name)
    finally:
        os.close(target_fd)
    return changed


def default_channel_dir(channels_dir: str | Path, channel: str) -> str:
    """The channel's directory from the host config (the agent sees it at the same path by default)."""
    return ChannelDir.path_of(channels_dir, channel)
