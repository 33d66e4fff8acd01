"""A pyfuse3 filesystem whose root directory can be made slow on demand: a
backing that stops answering (a hung NFS server, a stuck FUSE daemon),
mounted inside credfs's backing tree.

Run as a script: `python slowdirfs.py MOUNTPOINT`. It mounts an empty root
directory (attribute timeout 0) that can be opened and listed, and prints
"ready". It answers at once until it gets SIGUSR2 ("armed" is printed): from
then on every GETATTR, OPENDIR and READDIR of the root waits, and "stalled"
is printed when the first of them starts waiting. SIGUSR1 answers those
waiting and disarms it. SIGTERM answers all and ends it, unmounting.
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


class SlowDirFs(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.released = trio.Event()
        self.reported = False

    async def _maybe_wait(self) -> None:
        if not self.armed:
            return
        released = self.released
        if not self.reported:
            self.reported = True
            print("stalled", flush=True)
        await released.wait()

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._maybe_wait()
        return fsmain.root_attrs()

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._maybe_wait()
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._maybe_wait()

    async def releasedir(self, fh: int) -> None:
        pass


def main() -> None:
    fs = SlowDirFs()

    def on_signal(signum: int, ending: bool) -> None:
        if signum == signal.SIGUSR2:
            fs.armed = True
            print("armed", flush=True)
            return
        fs.armed = False
        released, fs.released, fs.reported = fs.released, trio.Event(), False
        released.set()

    fsmain.serve(fs, sys.argv[1], ["fsname=slowdirfs", "allow_other"],
                 signals=(signal.SIGUSR1, signal.SIGUSR2), on_signal=on_signal)

if __name__ == "__main__":
    main()
