"""Just enough io_uring (raw syscalls, no liburing) to submit an operation that
runs in an io-wq worker thread: NOP and OPENAT, both forced async.

An io-wq worker ("iou-wrk-<pid>") is a thread of the submitting process that
keeps the credentials the process had when the worker was created; each
request it runs is done under override_creds() with the submitter's
credentials at submission. /proc/<worker>/status shows the former.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_IO_URING_SETUP = 425  # x86_64 and the generic table alike
SYS_IO_URING_ENTER = 426
IORING_ENTER_GETEVENTS = 1
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OP_NOP = 0
IORING_OP_OPENAT = 18
IOSQE_ASYNC = 1 << 4
AT_FDCWD = -100
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe, 16 bytes


class UringUnavailable(OSError):
    pass


class Ring:
    """One ring of 4 entries, one request in flight at a time."""

    def __init__(self) -> None:
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        fd = _libc.syscall(SYS_IO_URING_SETUP, 4, params)
        if fd < 0:
            err = ctypes.get_errno()
            raise UringUnavailable(err, os.strerror(err))
        self.fd = fd
        p = params.raw
        sq_entries, cq_entries = struct.unpack_from("<II", p, 0)
        (self._sq_head, self._sq_tail, self._sq_mask, _e, _f, _d,
         sq_array) = struct.unpack_from("<7I", p, 40)
        (self._cq_head, self._cq_tail, self._cq_mask, _e2, _o,
         self._cqes) = struct.unpack_from("<6I", p, 80)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        self.sq = mmap.mmap(fd, sq_array + 4 * sq_entries, mmap.MAP_SHARED, prot,
                            offset=IORING_OFF_SQ_RING)
        self.cq = mmap.mmap(fd, self._cqes + _CQE.size * cq_entries, mmap.MAP_SHARED, prot,
                            offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(fd, 64 * sq_entries, mmap.MAP_SHARED, prot,
                              offset=IORING_OFF_SQES)
        self._sq_array = sq_array
        self._keep: list[ctypes.Array[ctypes.c_char]] = []

    def _u32(self, m: mmap.mmap, off: int) -> int:
        return int(struct.unpack_from("<I", m, off)[0])

    def _run(self, opcode: int, fd: int = 0, addr: int = 0, length: int = 0,
             op_flags: int = 0) -> int:
        tail = self._u32(self.sq, self._sq_tail)
        index = tail & self._u32(self.sq, self._sq_mask)
        _SQE.pack_into(self.sqes, 64 * index, opcode, IOSQE_ASYNC, 0, fd, 0, addr, length,
                       op_flags, 1, 0, 0, 0, 0, 0)
        struct.pack_into("<I", self.sq, self._sq_array + 4 * index, index)
        struct.pack_into("<I", self.sq, self._sq_tail, tail + 1)
        if _libc.syscall(SYS_IO_URING_ENTER, self.fd, 1, 1, IORING_ENTER_GETEVENTS,
                         None, 0) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        head = self._u32(self.cq, self._cq_head)
        assert self._u32(self.cq, self._cq_tail) != head, "no completion"
        _ud, res, _fl = _CQE.unpack_from(
            self.cq, self._cqes + _CQE.size * (head & self._u32(self.cq, self._cq_mask)))
        struct.pack_into("<I", self.cq, self._cq_head, head + 1)
        return int(res)

    def nop(self) -> int:
        """A NOP run by a worker: makes one if there is none."""
        return self._run(IORING_OP_NOP)

    def openat(self, path: bytes, flags: int, mode: int) -> int:
        """openat(AT_FDCWD, path, flags, mode) run by a worker: fd or -errno."""
        buf = ctypes.create_string_buffer(path)
        self._keep.append(buf)
        return self._run(IORING_OP_OPENAT, AT_FDCWD, ctypes.addressof(buf), mode, flags)

    def close(self) -> None:
        for m in (self.sq, self.cq, self.sqes):
            m.close()
        os.close(self.fd)


def worker_groups() -> list[tuple[int, ...]]:
    """The Groups: of this process's io-wq worker threads, from /proc."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        if fields.get(b"Name", b"").strip().startswith(b"iou-wrk-"):
            found.append(tuple(int(g) for g in fields[b"Groups"].split()))
    return found
