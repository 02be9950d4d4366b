"""The inbox reader against an agent that swaps an entry between the host's check and its open.

`ChannelDir.read` lstat()s an entry, then opens it with O_NOFOLLOW|O_NONBLOCK and compares the
fstat() of what it opened with what it checked. These tests make the swap happen at exactly that
moment (a wrapped os.open), which a real agent could only hit by luck.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from safespawn.broker import inbox
from safespawn.broker.inbox import ChannelDir, Entry, create_channel_dirs
from safespawn.errors import BadRequest, QuotaExceeded

RID = "0123456789abcdef0123456789abcdef"
GOOD = b'{"v":1,"id":"' + RID.encode() + b'","op":"stop","pid":5}'


@pytest.fixture
def chan(tmp_path: Path):
    base = tmp_path / "ch"
    create_channel_dirs(str(base))
    (tmp_path / "q").mkdir()
    with ChannelDir(str(base), str(tmp_path / "q")) as c:
        yield c, base


def _swap_on_open(monkeypatch: pytest.MonkeyPatch, swap) -> None:
    real_open = os.open
    done = []

    def wrapped(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if path == f"{RID}.json" and not done:
            done.append(True)
            swap()
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(inbox.os, "open", wrapped)


def test_an_entry_swapped_for_a_symlink_after_the_check_is_not_followed(chan, tmp_path, monkeypatch):
    c, base = chan
    new = base / "inbox" / "new"
    (new / f"{RID}.json").write_bytes(GOOD)
    secret = tmp_path / "secret"
    secret.write_text("host secret")

    def swap() -> None:
        os.unlink(new / f"{RID}.json")
        os.symlink(secret, new / f"{RID}.json")

    _swap_on_open(monkeypatch, swap)
    with pytest.raises(OSError) as e:
        c.read(Entry(f"{RID}.json", RID), 65536)
    assert e.value.errno == errno.ELOOP


def test_an_entry_swapped_for_another_file_after_the_check_is_refused(chan, monkeypatch):
    c, base = chan
    new = base / "inbox" / "new"
    (new / f"{RID}.json").write_bytes(GOOD)

    def swap() -> None:
        (new / "other").write_bytes(GOOD.replace(b"stop", b"start"))
        os.rename(new / "other", new / f"{RID}.json")

    _swap_on_open(monkeypatch, swap)
    with pytest.raises(BadRequest, match="changed while it was read"):
        c.read(Entry(f"{RID}.json", RID), 65536)


def test_an_entry_swapped_for_a_fifo_after_the_check_does_not_block(chan, monkeypatch):
    c, base = chan
    new = base / "inbox" / "new"
    (new / f"{RID}.json").write_bytes(GOOD)

    def swap() -> None:
        os.unlink(new / f"{RID}.json")
        os.mkfifo(new / f"{RID}.json")

    _swap_on_open(monkeypatch, swap)
    with pytest.raises(BadRequest, match="changed while it was read"):
        c.read(Entry(f"{RID}.json", RID), 65536)


def test_an_entry_that_gets_a_second_link_after_the_check_is_refused(chan, tmp_path, monkeypatch):
    c, base = chan
    new = base / "inbox" / "new"
    (new / f"{RID}.json").write_bytes(GOOD)
    _swap_on_open(monkeypatch, lambda: os.link(new / f"{RID}.json", base / "inbox" / "tmp" / "second"))
    with pytest.raises(BadRequest, match="changed while it was read"):
        c.read(Entry(f"{RID}.json", RID), 65536)


def test_an_entry_that_grows_after_the_check_is_cut_at_the_cap(chan, monkeypatch):
    c, base = chan
    new = base / "inbox" / "new"
    (new / f"{RID}.json").write_bytes(GOOD)

    def grow() -> None:
        with open(new / f"{RID}.json", "ab") as f:
            f.write(b" " * 100_000)

    _swap_on_open(monkeypatch, grow)
    with pytest.raises(QuotaExceeded):
        c.read(Entry(f"{RID}.json", RID), 1024)


def test_a_good_entry_is_read_whole(chan):
    c, base = chan
    (base / "inbox" / "new" / f"{RID}.json").write_bytes(GOOD)
    assert c.read(Entry(f"{RID}.json", RID), 65536) == GOOD
