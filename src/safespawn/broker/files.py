"""Durable, link-safe file operations relative to directory file descriptors.

The broker runs as root over directories a container can write to, so every path it touches there
is opened relative to a directory fd, never following a symlink, and every write it must not lose
is fsync'd before it is published by rename.
"""

from __future__ import annotations

import os

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink at its last component."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(dir_fd: int, name: str, data: bytes, mode: int = 0o644, fsync: bool = True) -> None:
    """Write `name` inside `dir_fd` atomically: a fresh temp file, fsync, rename over the target.

    The rename replaces whatever `name` was, including a planted symlink, without following it.
    """
    tmp = f".{name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp, dir_fd)
        raise
    os.close(fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quiet(tmp, dir_fd)
        raise


def _unlink_quiet(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def append_line(path: str, line: bytes, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
