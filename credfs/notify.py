"""Notifications the daemon sends the kernel on its own /dev/fuse descriptor.

FUSE_NOTIFY_INC_EPOCH (Linux 6.16+) makes every cached dentry of the mount
stale at once: the next walk through any of them asks the daemon again. It
takes no locks, so it can be sent *before* the reply to a chmod or rename
(whose directory locks would block a per-name invalidation until after the
change had returned). pyfuse3 does not offer it, so it is written here
directly: a bare fuse_out_header whose error field carries the notify code.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

FUSE_NOTIFY_INC_EPOCH = 8
_HEADER = struct.Struct("<IiQ")  # len, error (= notify code), unique (= 0)


def find_fuse_fd() -> int | None:
    """The process's /dev/fuse descriptor (pyfuse3 keeps it to itself)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


class KernelNotifier:
    def __init__(self, fuse_fd: int | None) -> None:
        self.fd = fuse_fd
        self.epochs_supported = fuse_fd is not None

    def attach(self, fuse_fd: int | None) -> None:
        self.fd = fuse_fd
        self.epochs_supported = fuse_fd is not None

    def drop_all_entries(self) -> bool:
        """Make every cached dentry of the mount stale now; False if unsupported."""
        if not self.epochs_supported or self.fd is None:
            return False
        try:
            os.write(self.fd, _HEADER.pack(_HEADER.size, FUSE_NOTIFY_INC_EPOCH, 0))
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                log.warning("kernel has no FUSE_NOTIFY_INC_EPOCH: cached names are "
                            "invalidated one by one, after the change returns")
                self.epochs_supported = False
                return False
            raise
        return True
