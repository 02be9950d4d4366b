"""When a new sidecar's program is past its start-up: its own pid file, written after a checked start.

A profile's `ready_pid_file` names the option that gives the program's pid file (dnsmasq writes it
once its sockets and lease file are set up, and exits before writing it when they fail). The file
lies in a data dir the agent can write, so it is only ever lstat'ed.
"""

from __future__ import annotations

import os
import stat


def written_since(path: str, since: float) -> bool:
    """Whether `path` is a regular file modified at or after `since` (wall clock).

    The path lies in an agent-writable data dir: it is only lstat'ed, never opened or followed. An
    agent that fakes the file only makes its own sidecar's start reported before it settled.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_mtime >= since - 0.01
