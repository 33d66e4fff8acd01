"""A pyfuse3 filesystem with an empty, world-writable root and no way to make
anything in it: CREATE and MKNOD get ENOSYS (pyfuse3's default for an
operation a filesystem does not implement), as from many read-mostly FUSE
filesystems. open(O_CREAT) in it therefore fails with ENOSYS.

Run as a script: `python enosysfs.py MOUNTPOINT`; prints "ready" once
pyfuse3 has the mount (the caller waits for it in /proc/self/mountinfo);
SIGTERM ends it and unmounts. Mounted with allow_other so that another
daemon acting for users can reach it.
"""

from __future__ import annotations

import errno
import sys

import pyfuse3

try:
    from . import fsmain  # imported by a test (helpers.<name>)
except ImportError:
    import fsmain  # run as a script: this directory is on sys.path


class EnosysFs(pyfuse3.Operations):
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return fsmain.root_attrs(0o777)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)


def main() -> None:
    fsmain.serve(EnosysFs(), sys.argv[1], ["fsname=enosysfs", "allow_other"],
                 min_tasks=1, max_tasks=2)

if __name__ == "__main__":
    main()
