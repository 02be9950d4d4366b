"""The wire format of the channel: requests the agent writes and replies the host writes.

Everything here parses data written by a party we do not trust. `parse_request` reads as a
checklist: decode strictly, reject what is unknown, check every field's type and range, and
return a frozen value; anything else is a `BadRequest` with a reason the reply can carry.
"""

from __future__ import annotations

import json
import re
import signal as _signal
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, ErrorCode

PROTOCOL_VERSION = 1
ID_RE = re.compile(r"[0-9a-f]{32}")
PROFILE_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
# A netns name here is only screened for shape; the profile's pattern decides what is allowed.
NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
OPS = ("start", "signal", "stop")
KEYS = {
    "start": {"v", "id", "op", "profile", "netns", "argv"},
    "signal": {"v", "id", "op", "profile", "netns", "signal", "pid"},
    "stop": {"v", "id", "op", "profile", "netns", "pid"},
}
MAX_ARGS = 256
MAX_ARG_LEN = 4096
MAX_PID = 1 << 22  # the kernel's pid_max ceiling
# Signals a request may name at all; each profile narrows this further.
SIGNALS = ("HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM")


@dataclass(frozen=True)
class Request:
    id: str
    op: str
    profile: str | None = None
    netns: str | None = None
    argv: tuple[str, ...] = ()
    signal: str | None = None
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self.id, "op": self.op}
        if self.profile is not None:
            d["profile"] = self.profile
        # A signal or stop by pid may name a netns too: it is written whenever it is set, so what
        # the parser accepted round-trips unchanged.
        if self.op == "start" or self.profile is not None or self.netns is not None:
            d["netns"] = self.netns
        if self.op == "start":
            d["argv"] = list(self.argv)
        if self.signal is not None:
            d["signal"] = self.signal
        if self.pid is not None:
            d["pid"] = self.pid
        return d


@dataclass(frozen=True)
class ReplyError:
    code: str
    message: str


@dataclass(frozen=True)
class Reply:
    id: str
    ok: bool
    sidecar: str | None = None
    pid: int | None = None
    error: ReplyError | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "id": self.id,
            "ok": self.ok,
            "sidecar": self.sidecar,
            "pid": self.pid,
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message},
        }

    @classmethod
    def failure(cls, rid: str, code: ErrorCode | str, message: str) -> Reply:
        return cls(id=rid, ok=False, error=ReplyError(str(getattr(code, "value", code)), message))


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"non-standard JSON constant {name}")


def _parse_int(text: str) -> int:
    # DENY: huge integers cost quadratic time to convert and mean nothing here.
    if len(text.lstrip("-")) > 12:
        raise BadRequest("integer out of range")
    return int(text)


def _parse_float(text: str) -> Any:
    raise BadRequest("floating point numbers are not accepted")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        # DENY: duplicate keys are read differently by different parsers; refuse the ambiguity.
        if k in d:
            raise BadRequest(f"duplicate key {k!r}")
        d[k] = v
    return d


def decode_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no floats, no duplicate keys, bounded depth."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest("request is not valid UTF-8") from e
    if "\x00" in text:
        raise BadRequest("request contains a NUL byte")
    # DENY: deep nesting; a request is flat, so anything deeper than 3 levels is hostile.
    depth = 0
    in_str = False
    esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > 3:
                raise BadRequest("request is nested too deeply")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_keys,
        )
    except BadRequest:
        raise
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"request is not valid JSON: {e}") from e


def normalize_signal(value: Any) -> str:
    """'HUP', 'SIGHUP', 'hup', '1' and 1 all mean HUP; anything outside SIGNALS is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest("signal must be a name or a number")
    text = str(value).strip().upper()
    if text.isdigit() and len(text) <= 3:
        try:
            text = _signal.Signals(int(text)).name
        except ValueError as e:
            raise BadRequest(f"unknown signal number {value!r}") from e
    if text.startswith("SIG"):
        text = text[3:]
    if text not in SIGNALS:
        raise BadRequest(f"signal {str(value)[:16]!r} is not accepted")
    return text


def _str_field(d: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise BadRequest(f"{key} must be {what}")
    return v


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def has_control_char(text: str) -> bool:
    """Newline, NUL, escape and the rest of C0, and DEL."""
    return _CONTROL.search(text) is not None


def _check_arg(i: int, a: Any) -> str:
    if not isinstance(a, str):
        raise BadRequest(f"argv[{i}] is not a string")
    if len(a) > MAX_ARG_LEN:
        raise BadRequest(f"argv[{i}] is longer than {MAX_ARG_LEN} characters")
    # DENY: control characters (newline, NUL, escape) can smuggle extra lines into configs and logs.
    if has_control_char(a):
        raise BadRequest(f"argv[{i}] contains a control character")
    return a


def parse_request(raw: bytes, expected_id: str | None = None) -> Request:
    """Parse and validate one request; `expected_id` is the id its file name carries."""
    d = decode_json(raw)
    if not isinstance(d, dict):
        raise BadRequest("request must be a JSON object")
    if d.get("v") != PROTOCOL_VERSION or isinstance(d.get("v"), bool):
        raise BadRequest(f"unsupported protocol version (want v={PROTOCOL_VERSION})")
    rid = _str_field(d, "id", ID_RE, "32 lowercase hex characters")
    if expected_id is not None and rid != expected_id:
        # DENY: the file name is what replies are addressed by; a mismatch could answer someone else.
        raise BadRequest("id does not match the request's file name")
    op = d.get("op")
    if op not in OPS:
        raise BadRequest(f"op must be one of {', '.join(OPS)}")
    unknown = set(d) - KEYS[op]
    if unknown:
        raise BadRequest(f"unknown keys for op {op}: {', '.join(sorted(unknown))[:200]}")

    profile = None
    if d.get("profile") is not None:
        profile = _str_field(d, "profile", PROFILE_RE, "a profile name")
    netns = None
    if d.get("netns") is not None:
        netns = _str_field(d, "netns", NETNS_RE, "a network namespace name")

    if op == "start":
        if profile is None:
            raise BadRequest("start needs a profile")
        argv = d.get("argv", [])
        if not isinstance(argv, list):
            raise BadRequest("argv must be a list of strings")
        if len(argv) > MAX_ARGS:
            raise BadRequest(f"argv has more than {MAX_ARGS} arguments")
        return Request(rid, op, profile, netns, tuple(_check_arg(i, a) for i, a in enumerate(argv)))

    pid = None
    if d.get("pid") is not None:
        p = d["pid"]
        if isinstance(p, bool) or not isinstance(p, int) or not 1 < p < MAX_PID:
            raise BadRequest("pid must be an integer process id")
        pid = p
    if pid is None and profile is None:
        raise BadRequest(f"{op} needs a pid or a profile")
    sig = None
    if op == "signal":
        if "signal" not in d:
            raise BadRequest("signal needs a signal")
        sig = normalize_signal(d["signal"])
    return Request(rid, op, profile, netns, (), sig, pid)
