"""A pyfuse3 filesystem whose directory listings wait when told to: a slow
backing directory, mounted inside credfs's backing tree.

Run as a script: `python listfs.py MOUNTPOINT`. It mounts a root directory
holding files a0..a9 and prints "ready". Each pass over the root (a READDIR
at offset 0) takes the names as they are then; after SIGUSR2 ("armed" is
printed) such a pass waits before it answers, and "stalled N" is printed, N
the number of passes waiting. SIGHUP adds a name, "made", as a change behind
the filesystem's back would (a create could not: the kernel holds the
directory's lock, shared, while a READDIR waits), and prints "made". SIGUSR1
answers the passes waiting and disarms it. SIGTERM answers all and ends it,
unmounting.
"""

from __future__ import annotations

import errno
import signal
import stat
import sys

import pyfuse3
import trio

NAMES = [f"a{i}".encode() for i in range(10)]


class ListFs(pyfuse3.Operations):
    # Two passes may wait at once: without this the kernel holds a mutex of
    # the directory around each READDIR (scripts/pyfuse3-dirops.patch).
    enable_parallel_dirops = True

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {n: pyfuse3.ROOT_INODE + 1 + i
                                        for i, n in enumerate(NAMES)}
        self.snapshots: dict[int, list[tuple[bytes, int]]] = {}  # per open handle
        self.armed = False
        self.released = trio.Event()
        self.waiting = 0
        self.next_fh = 1

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 0
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o644, 1
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and inode not in self.names.values():
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.names[name])

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            self.snapshots[fh] = sorted(self.names.items())
            if self.armed:
                released = self.released
                self.waiting += 1
                print(f"stalled {self.waiting}", flush=True)
                await released.wait()
        for i, (name, ino) in enumerate(self.snapshots.get(fh, [])[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self.snapshots.pop(fh, None)


async def _serve(fs: ListFs) -> None:
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP,
                                           signal.SIGTERM, signal.SIGINT) as signals:
                print("ready", flush=True)
                async for signum in signals:
                    if signum == signal.SIGUSR2:
                        fs.armed = True
                        print("armed", flush=True)
                        continue
                    if signum == signal.SIGHUP:
                        fs.names[b"made"] = pyfuse3.ROOT_INODE + 1 + len(fs.names)
                        print("made", flush=True)
                        continue
                    fs.armed = False
                    fs.waiting = 0
                    released, fs.released = fs.released, trio.Event()
                    released.set()
                    if signum != signal.SIGUSR1:
                        pyfuse3.terminate()
                        return
        nursery.start_soon(on_signals)
        await pyfuse3.main(min_tasks=2, max_tasks=8)
        nursery.cancel_scope.cancel()


def main() -> None:
    fs = ListFs()
    pyfuse3.init(fs, sys.argv[1], ["fsname=listfs", "allow_other"])
    try:
        trio.run(_serve, fs)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
