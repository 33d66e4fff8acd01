"""What the agents do, as the benchmark uids. Each timed function returns
{"t0", "t1", "ops"}: CLOCK_MONOTONIC (the same clock in every process, so two
agents' phases can be joined) around the loop, and how many operations it did.

Per-file operations are relative to an open directory descriptor, as find, tar
and rm -r do: the cost measured is the file's, not a walk of the path prefix.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

Result = dict[str, Any]
MiB = 1 << 20


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


def _content(name: str, size: int) -> bytes:
    unit = (name + "\n").encode()
    return (unit * (size // len(unit) + 1))[:size]


def _timed(t0: float, ops: int, **extra: Any) -> Result:
    return {"t0": t0, "t1": time.monotonic(), "ops": ops, **extra}


def seq_write(path: str, total: int, block: int) -> Result:
    """Write total bytes in blocks to a new file, fsync, close. ops = MiB."""
    buf = bytes(range(256)) * (block // 256)
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = total
        while left:
            left -= os.write(fd, memoryview(buf)[:min(block, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return _timed(t0, total // MiB)


def seq_read(path: str, block: int) -> Result:
    """Read a whole file in blocks. ops = MiB."""
    buf = bytearray(block)
    total = 0
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return _timed(t0, total // MiB, bytes=total)


def create_files(d: str, prefix: str, n: int, size: int) -> Result:
    """Create n new files (O_EXCL), each with size bytes, and close them."""
    names = _names(prefix, n)
    data = {name: _content(name, size) for name in names} if size else {}
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.monotonic()
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            try:
                if size:
                    os.write(fd, data[name])
            finally:
                os.close(fd)
        return _timed(t0, n)
    finally:
        os.close(dfd)


def stat_files(d: str, prefix: str, n: int) -> Result:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.monotonic()
        for name in _names(prefix, n):
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return _timed(t0, n)
    finally:
        os.close(dfd)


def read_files(d: str, prefix: str, n: int, size: int) -> Result:
    """Open, read and close each file; the contents must be what was written."""
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.monotonic()
        bad = None
        for name in _names(prefix, n):
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            try:
                got = os.read(fd, size + 1)
            finally:
                os.close(fd)
            if bad is None and got != _content(name, size):
                bad = name
        res = _timed(t0, n)
    finally:
        os.close(dfd)
    if bad is not None:
        raise ValueError(f"{d}/{bad}: read back other contents than were written")
    return res


def list_dir(d: str) -> Result:
    """List a directory (names and types, no stat). ops = entries."""
    t0 = time.monotonic()
    with os.scandir(d) as it:
        n = sum(1 for _ in it)
    return _timed(t0, n)


def unlink_files(d: str, prefix: str, n: int) -> Result:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.monotonic()
        for name in _names(prefix, n):
            os.unlink(name, dir_fd=dfd)
        return _timed(t0, n)
    finally:
        os.close(dfd)


def try_unlink(path: str) -> int:
    """0 if the unlink worked, else its errno (used for the sticky-bit check)."""
    try:
        os.unlink(path)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def remove_tree(d: str) -> int:
    """Remove what a workload left in d, then d itself, through the candidate.

    Through the candidate rather than directly on the backing store: a daemon
    that holds descriptors on inodes (credfs) releases them when the kernel
    forgets the names, and it forgets them on unlink through the mount.
    """
    n = 0
    for root, dirs, files in os.walk(d, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
            n += 1
        for sub in dirs:
            os.rmdir(os.path.join(root, sub))
    os.rmdir(d)
    return n


FUNCTIONS = {f.__name__: f for f in (seq_write, seq_read, create_files, stat_files, read_files,
                                     list_dir, unlink_files, try_unlink, remove_tree)}
