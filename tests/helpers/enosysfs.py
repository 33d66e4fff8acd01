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
import signal
import stat
import sys

import pyfuse3
import trio


class EnosysFs(pyfuse3.Operations):
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode, a.st_nlink = stat.S_IFDIR | 0o777, 2
        return a

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(stop_on_signal)
        print("ready", flush=True)
        await pyfuse3.main(min_tasks=1, max_tasks=2)
        nursery.cancel_scope.cancel()


def main() -> None:
    pyfuse3.init(EnosysFs(), sys.argv[1], ["fsname=enosysfs", "allow_other"])
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
