"""A pyfuse3 filesystem whose root answers a GETATTR only when let: a backing
that is slow on demand, mounted inside credfs's backing tree.

Run as a script: `python stallfs.py MOUNTPOINT`. It mounts an empty root
directory (attribute timeout 0) and prints "ready". Every GETATTR of the root
then waits until the process gets SIGUSR1, which answers those waiting; the
next ones wait for the next SIGUSR1. It prints "stalled" when the first of
each wait starts. SIGTERM answers all and ends it, unmounting.
"""

from __future__ import annotations

import errno
import signal
import stat
import sys

import pyfuse3
import trio


class StallFs(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.released = trio.Event()
        self.reported = False
        self.ending = False

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not self.ending:
            released = self.released
            if not self.reported:
                self.reported = True
                print("stalled", flush=True)
            await released.wait()
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.ROOT_INODE
        a.attr_timeout = 0
        a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        return a

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)


async def _serve(fs: StallFs) -> None:
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM,
                                           signal.SIGINT) as signals:
                async for signum in signals:
                    released, fs.released, fs.reported = fs.released, trio.Event(), False
                    if signum != signal.SIGUSR1:
                        fs.ending = True
                    released.set()
                    if fs.ending:
                        pyfuse3.terminate()
                        return
        nursery.start_soon(on_signals)
        print("ready", flush=True)
        await pyfuse3.main(min_tasks=2, max_tasks=8)
        nursery.cancel_scope.cancel()


def main() -> None:
    fs = StallFs()
    pyfuse3.init(fs, sys.argv[1], ["fsname=stallfs", "allow_other"])
    try:
        trio.run(_serve, fs)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
