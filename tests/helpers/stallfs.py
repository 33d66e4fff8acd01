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
import sys

import pyfuse3
import trio

try:
    from . import fsmain  # imported by a test (helpers.<name>)
except ImportError:
    import fsmain  # run as a script: this directory is on sys.path


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
        return fsmain.root_attrs()

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)


def main() -> None:
    fs = StallFs()

    def on_signal(signum: int, ending: bool) -> None:
        # SIGUSR1 answers those waiting; the next ones wait for the next.
        released, fs.released, fs.reported = fs.released, trio.Event(), False
        fs.ending = ending
        released.set()

    fsmain.serve(fs, sys.argv[1], ["fsname=stallfs", "allow_other"],
                 signals=(signal.SIGUSR1,), on_signal=on_signal)

if __name__ == "__main__":
    main()
