"""A trivial pyfuse3 filesystem that reports its request loop's polling window.

Run as a script: `python pollfs.py MOUNTPOINT POLL_US`. It mounts a root
directory holding files f0..f9 (constant attributes, entry and attribute
timeouts 0: every stat is a LOOKUP and a GETATTR) and serves them with
pyfuse3.main(poll_us=POLL_US), printing "ready" once mounted. A getxattr of
user.poll.window_us on the root answers pyfuse3.poll_window_us(), the window
as it stands after the loop adapted to the quiet time before that request.
SIGTERM ends it and unmounts.
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3

try:
    from . import fsmain  # imported by a test (helpers.<name>)
except ImportError:
    import fsmain  # run as a script: this directory is on sys.path

WINDOW_XATTR = b"user.poll.window_us"
FILES = 10


class PollFs(pyfuse3.Operations):
    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = 0
        a.attr_timeout = 0
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o644, 1
        return a

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        names = {f"f{i}".encode(): pyfuse3.ROOT_INODE + 1 + i for i in range(FILES)}
        if parent_inode == pyfuse3.ROOT_INODE and name in names:
            return self._attrs(names[name])
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == WINDOW_XATTR:
            return str(pyfuse3.poll_window_us()).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    mountpoint, poll_us = sys.argv[1], int(sys.argv[2])
    fsmain.serve(PollFs(), mountpoint, ["fsname=pollfs"], poll_us=poll_us)

if __name__ == "__main__":
    main()
