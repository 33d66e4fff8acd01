"""A pyfuse3 filesystem that records the requests it gets, with their ids.

Run as a script: `python recordfs.py MOUNTPOINT cached|uncached`. It mounts an
empty root directory in which files and directories can be made (in memory)
and prints "ready". A LOOKUP of a name that is not there is answered with a
negative entry the kernel keeps for a minute (cached) or with ENOENT
(uncached). Every LOOKUP, CREATE, MKDIR and GETATTR is recorded as
[opcode, request id, thread id, name]; a getxattr of user.record on the root
answers the records so far as JSON and starts a new list (the getxattr
itself is not recorded). SIGTERM ends it and unmounts. Needs a pyfuse3 with
RequestContext.unique (scripts/pyfuse3-unique.patch).
"""

from __future__ import annotations

import errno
import json
import stat
import sys

import pyfuse3

try:
    from . import fsmain  # imported by a test (helpers.<name>)
except ImportError:
    import fsmain  # run as a script: this directory is on sys.path

RECORD_XATTR = b"user.record"


class RecordFs(pyfuse3.Operations):
    def __init__(self, cached: bool) -> None:
        super().__init__()
        self.cached = cached
        self.names: dict[bytes, tuple[int, int]] = {}  # name -> (inode, mode)
        self.records: list[list[object]] = []

    def _record(self, op: str, ctx: pyfuse3.RequestContext, name: bytes = b"") -> None:
        self.records.append([op, ctx.unique, ctx.pid, name.decode()])

    def _attrs(self, ino: int, mode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 60
        a.st_mode, a.st_nlink = mode, 2 if stat.S_ISDIR(mode) else 1
        return a

    def _new(self, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
        if name in self.names:
            raise pyfuse3.FUSEError(errno.EEXIST)
        self.names[name] = (pyfuse3.ROOT_INODE + 1 + len(self.names), mode)
        return self._attrs(*self.names[name])

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._record("LOOKUP", ctx, name)
        if name in self.names:
            return self._attrs(*self.names[name])
        if not self.cached:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0  # "no such name", for entry_timeout seconds
        a.entry_timeout = 60
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        self._record("GETATTR", ctx)
        if inode == pyfuse3.ROOT_INODE:
            return self._attrs(inode, stat.S_IFDIR | 0o777)
        for ino, mode in self.names.values():
            if ino == inode:
                return self._attrs(ino, mode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._record("CREATE", ctx, name)
        return pyfuse3.FileInfo(fh=1), self._new(name, stat.S_IFREG | (mode & 0o7777))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._record("MKDIR", ctx, name)
        return self._new(name, stat.S_IFDIR | (mode & 0o7777))

    async def release(self, fh: int) -> None:
        pass

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == RECORD_XATTR:
            out, self.records = self.records, []
            return json.dumps(out).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    mountpoint, mode = sys.argv[1], sys.argv[2]
    fsmain.serve(RecordFs(cached=mode == "cached"), mountpoint, ["fsname=recordfs"])

if __name__ == "__main__":
    main()
