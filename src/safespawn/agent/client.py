"""The container side of a safespawn channel: write a request, wait for its reply.

This file is self-contained on purpose: it is copied beside the wrappers into agent images, so it
imports only the standard library and runs on Python 3.9. It never needs privileges; it only
writes files into the channel's inbox and reads the outbox.

    >>> reply = submit("/var/lib/safespawn/channels/neutron-dhcp",
    ...                start_request("dnsmasq", ["--no-hosts", ...], netns="qdhcp-..."))

The channel contract (see docs/channel.md):
    inbox/tmp/ID          the request while it is being written (never read by the host)
    inbox/new/ID.json     a complete request: renamed from tmp/ atomically
    inbox/trigger         touched after each request (the systemd path unit watches it)
    outbox/replies/ID.json  the host's reply, written atomically
    outbox/status.json    the channel's sidecars, published by the host
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time

# typing is imported for the type checker only: at run time it would cost a wrapper process more
# than the rest of this module (benchmarks/client_cost.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT = 60.0
NETNS_DIR = "/run/netns"

# Exit codes shared with `safespawn submit`.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_BROKER = 4


class NoBroker(Exception):
    """No reply arrived within the timeout."""


def new_id() -> str:
    return os.urandom(16).hex()


def start_request(profile: str, argv: List[str], netns: Optional[str] = None) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": new_id(), "op": "start", "profile": profile,
            "netns": netns, "argv": list(argv)}


def signal_request(signal: str, pid: Optional[int] = None, profile: Optional[str] = None,
                   netns: Optional[str] = None) -> Dict[str, Any]:
    req = {"v": PROTOCOL_VERSION, "id": new_id(), "op": "signal", "signal": str(signal)}  # type: Dict[str, Any]
    if pid is not None:
        req["pid"] = int(pid)
    if profile is not None:
        req["profile"] = profile
        req["netns"] = netns
    return req


def stop_request(profile: str, netns: Optional[str] = None, pid: Optional[int] = None) -> Dict[str, Any]:
    req = {"v": PROTOCOL_VERSION, "id": new_id(), "op": "stop"}  # type: Dict[str, Any]
    if pid is not None:
        req["pid"] = int(pid)
    else:
        req["profile"] = profile
        req["netns"] = netns
    return req


def current_netns(netns_dir: str = NETNS_DIR) -> Optional[str]:
    """The name of the named network namespace this process is in, like `ip netns identify`.

    Compares the (device, inode) of /proc/self/ns/net with every entry of `netns_dir`.
    Returns None when the process is in no named namespace (e.g. the host's or a container's own).
    """
    try:
        mine = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    try:
        names = sorted(os.listdir(netns_dir))
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join(netns_dir, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return name
    return None


def _open_dir(name: str, dir_fd: Optional[int] = None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)


def _write_request(channel_dir: str, request: Dict[str, Any]) -> str:
    rid = request["id"]
    data = json.dumps(request, separators=(",", ":")).encode("utf-8")
    # Every step goes through directory fds opened without following links: the agent owns inbox/,
    # so when root runs this on the host (`safespawn submit`), a symlink planted in place of
    # inbox/tmp or inbox/new must not send root's write or rename anywhere else.
    inbox = _open_dir(os.path.join(channel_dir, "inbox"))
    try:
        tmp_dir = _open_dir("tmp", inbox)
        try:
            new_dir = _open_dir("new", inbox)
            try:
                fd = os.open(rid, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644,
                             dir_fd=tmp_dir)
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # The rename is the commit point: the host never sees a half-written request.
                os.rename(rid, rid + ".json", src_dir_fd=tmp_dir, dst_dir_fd=new_dir)
            finally:
                os.close(new_dir)
        finally:
            os.close(tmp_dir)
        _touch_trigger(inbox)
    finally:
        os.close(inbox)
    return os.path.join(channel_dir, "inbox", "new", rid + ".json")


def _touch_trigger(inbox: int) -> None:
    try:
        tfd = os.open("trigger", os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644, dir_fd=inbox)
        try:
            os.write(tfd, b"")
            os.utime(tfd)
        finally:
            os.close(tfd)
    except OSError:
        pass  # the trigger only speeds things up; the level-triggered watch and the timer still drain


def _read_reply(path: str, rid: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    try:
        reply = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(reply, dict) or reply.get("id") != rid:
        return None
    return reply


def submit(channel_dir: str, request: Dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Write `request` into the channel and block until its reply arrives.

    Raises NoBroker when no reply arrives within `timeout` seconds; the request is then withdrawn
    from the inbox if the broker has not taken it yet.
    """
    rid = request["id"]
    new = _write_request(channel_dir, request)
    reply_path = os.path.join(channel_dir, "outbox", "replies", rid + ".json")
    start = time.monotonic()
    deadline = start + timeout
    delay = 0.001
    while True:
        reply = _read_reply(reply_path, rid)
        if reply is not None:
            return reply
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(delay, deadline - now))
        # A resident broker answers a signal in a few ms and a start in about a hundred: look every
        # millisecond at first, then every 5 ms (one failed open() each, ~200 in the first second),
        # and back off after a second. Waiting on inotify instead was measured to cost
        # more (importing ctypes, ~8 ms a process) than this poll adds (benchmarks/client_cost.py),
        # and each waiting client would hold one of its uid's inotify instances.
        delay = min(delay * 1.25, 0.005 if now - start < 1.0 else 0.1)
    withdrawn = False
    try:
        os.unlink(new)
        withdrawn = True
    except OSError:
        pass
    if not withdrawn:
        # The broker has taken the request: give it a moment to finish its reply.
        grace = time.monotonic() + 5.0
        while time.monotonic() < grace:
            reply = _read_reply(reply_path, rid)
            if reply is not None:
                return reply
            time.sleep(0.05)
    raise NoBroker(
        "no reply from the safespawn broker within %.0fs for request %s (%s); is the host's "
        "safespawn-sync path unit (or `safespawn watch`) running for %s?"
        % (timeout, rid, "withdrawn" if withdrawn else "taken but unanswered", channel_dir))


def describe_error(reply: Dict[str, Any]) -> str:
    err = reply.get("error") or {}
    return "%s: %s" % (err.get("code", "error"), err.get("message", "request failed"))


def _timeout_from_env() -> float:
    return _float_env("SAFESPAWN_TIMEOUT", DEFAULT_TIMEOUT)


# The option that names the pid file each program writes, where it is on the command line.
PID_FILE_OPTIONS = {
    "dnsmasq": "--pid-file",
    "haproxy": "-p",  # added by the wrapper from the config's pidfile (haproxy_pid_file_args)
    "keepalived": "-p",
    "radvd": "-p",
    "neutron-keepalived-state-change": "--pid_file",
}
# Programs that Neutron starts from its own namespace and tells which one to act on.
NETNS_OPTIONS = {"neutron-keepalived-state-change": "--namespace"}
DEFAULT_PID_FILE_WAIT = 5.0


def program_args(argv: List[str]) -> List[str]:
    """The arguments a wrapper forwards: Neutron's, minus empty strings.

    Neutron's dnsmasq driver passes '' in place of --no-resolv when dnsmasq_local_resolv is set;
    dnsmasq ignores it, and an empty argument is never an option the policy could allow.
    """
    return [a for a in argv if a != ""]


def option_value(argv: List[str], option: str) -> Optional[str]:
    """The value of `option` given as `OPT VALUE` or `OPT=VALUE` (the last one wins), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(option + "="):
            value = a[len(option) + 1:]
    return value


def haproxy_pid_file_args(args: List[str]) -> List[str]:
    """haproxy's args plus `-p PATH` for the `pidfile PATH` line of its `-f` config.

    Neutron names haproxy's pid file in the config it writes, not on the command line. The host
    writes pid files with the sidecar's host pid, but never parses a config the agent wrote: the
    wrapper (on the agent's side, reading the agent's own file) names it on the command line.
    haproxy 2.6 lets `-p` win over the config's `pidfile` ("'pidfile' already specified.
    Continuing."), so the program's own write goes where the host's policy sends it.
    """
    if option_value(args, "-p") is not None:
        return args
    config = option_value(args, "-f")
    if not config:
        return args
    try:
        with open(config) as f:
            text = f.read(1 << 20)
    except (OSError, ValueError):
        return args
    pidfile = None
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "pidfile":
            pidfile = words[1]
    return args + ["-p", pidfile] if pidfile else args


def _wait_for_pid_file(path: str, timeout: float) -> bool:
    """Wait until `path` holds a pid, as a daemonizing program's parent does before it exits.

    Neutron reads the pid file right after the command returns (ProcessManager.active).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                if f.read(32).strip().isdigit():
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _ask(channel_dir: str, request: Dict[str, Any], who: str) -> Tuple[Optional[Dict[str, Any]], int]:
    """Submit and wait; on failure to get a reply, say why on stderr and return the exit code."""
    try:
        return submit(channel_dir, request, timeout=_timeout_from_env()), EXIT_OK
    except NoBroker as e:
        sys.stderr.write("%s: %s\n" % (who, e))
        return None, EXIT_NO_BROKER
    except OSError as e:
        sys.stderr.write("%s: cannot write to the safespawn channel %s: %s\n" % (who, channel_dir, e))
        return None, EXIT_FAILED


def wrapper_main(profile: str, channel_dir: str, argv: Optional[List[str]] = None) -> int:
    """Entry point of a program wrapper (`dnsmasq ARGS...`): ask the host to run it as a sidecar.

    The netns is the one this process runs in (Neutron runs `ip netns exec NS dnsmasq ...`), or
    for programs Neutron starts from its own namespace, the one their arguments name. Blocks until
    the host's reply; exits 0 once the sidecar runs (and its pid file holds a pid), else 1 with
    the reason on stderr.
    """
    args = program_args(list(sys.argv[1:] if argv is None else argv))
    if profile == "haproxy":
        args = haproxy_pid_file_args(args)
    netns = current_netns()
    if profile in NETNS_OPTIONS:
        netns = option_value(args, NETNS_OPTIONS[profile]) or netns
    reply, rc = _ask(channel_dir, start_request(profile, args, netns=netns), profile)
    if reply is None:
        return rc
    if not reply.get("ok"):
        sys.stderr.write("%s: refused by safespawn: %s\n" % (profile, describe_error(reply)))
        return EXIT_FAILED
    pid_file = option_value(args, PID_FILE_OPTIONS[profile]) if profile in PID_FILE_OPTIONS else None
    if pid_file:
        wait = _float_env("SAFESPAWN_PID_FILE_WAIT", DEFAULT_PID_FILE_WAIT)
        if not _wait_for_pid_file(pid_file, wait):
            _restore_pid_file(profile, pid_file, reply)
    return EXIT_OK


def _restore_pid_file(profile: str, pid_file: str, reply: Dict[str, Any]) -> None:
    """Write the pid the host reported when no pid file appeared.

    The host writes the pid file (with the sidecar's host pid) before it replies, so this only
    happens when the host refused to write it (something the agent planted at the path): the
    agent then writes its own file itself. The pid is the sidecar's main host pid.
    """
    pid = reply.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        sys.stderr.write("%s: sidecar %s runs, but %s has no pid\n" % (profile, reply.get("sidecar"), pid_file))
        return
    tmp = "%s.safespawn-%s" % (pid_file, new_id()[:8])
    try:
        with open(tmp, "w") as f:
            f.write("%d\n" % pid)
        os.rename(tmp, pid_file)
    except OSError as e:
        sys.stderr.write("%s: cannot write %s: %s\n" % (profile, pid_file, e))
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return
    sys.stderr.write("%s: sidecar %s was already running; wrote its pid %d to %s\n"
                     % (profile, reply.get("sidecar"), pid, pid_file))


def kill_main(profile: str, channel_dir: str, argv: Optional[List[str]] = None) -> int:
    """Entry point of a kill script (`dnsmasq-kill SIG PID`), as Neutron's kill_scripts_path runs it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.stderr.write("usage: %s-kill SIGNAL PID\n" % profile)
        return EXIT_USAGE
    sig, pid_text = args
    try:
        pid = int(pid_text)
    except ValueError:
        sys.stderr.write("%s-kill: bad pid %r\n" % (profile, pid_text))
        return EXIT_USAGE
    request = signal_request(sig, pid=pid)
    request["profile"] = profile
    reply, rc = _ask(channel_dir, request, profile + "-kill")
    if reply is None:
        return rc
    if reply.get("ok"):
        return EXIT_OK
    err = reply.get("error") or {}
    if err.get("code") == "not_found":
        # The wording Neutron (and kill(1)) use: the caller treats it as "already gone".
        sys.stderr.write("kill: (%d) - No such process\n" % pid)
    else:
        sys.stderr.write("%s-kill: refused by safespawn: %s\n" % (profile, describe_error(reply)))
    return EXIT_FAILED
