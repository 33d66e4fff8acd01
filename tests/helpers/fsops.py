"""Filesystem operations run inside a UserAgent (see agents.py).

Each function takes paths, does one thing with plain ``os`` calls and returns a
plain, picklable, deterministic value (no times, no inode numbers), so the
outcome of the same operation on the backing directory and through the mount can
be compared with ``==``. Errors are not caught here: the agent turns an OSError
into ("err", errno).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from typing import Any

# renameat2(2) flags, from <linux/fs.h>.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def access(path: str, mode: int) -> bool:
    # Agents have real == effective ids, so plain access(2) checks the agent itself.
    return os.access(path, mode)


def stat(path: str) -> dict[str, int]:
    st = os.stat(path, follow_symlinks=False)
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "nlink": st.st_nlink}


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes, flags: int = os.O_WRONLY) -> int:
    """open(path, O_WRONLY|flags, 0o666), write everything, close; bytes written."""
    if flags & os.O_ACCMODE == os.O_RDONLY:
        flags |= os.O_WRONLY
    fd = os.open(path, flags, 0o666)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        return done
    finally:
        os.close(fd)


def open_close(path: str, flags: int, mode: int = 0o666) -> None:
    os.close(os.open(path, flags, mode))


def mkdir(path: str, mode: int = 0o777) -> None:
    os.mkdir(path, mode)


def rmdir(path: str) -> None:
    os.rmdir(path)


def unlink(path: str) -> None:
    os.unlink(path)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def rename2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE (os has no wrapper)."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def link(src: str, dst: str) -> None:
    os.link(src, dst, follow_symlinks=False)


def symlink(target: str, path: str) -> None:
    os.symlink(target, path)


def readlink(path: str) -> str:
    return os.readlink(path)


def chmod(path: str, mode: int) -> None:
    os.chmod(path, mode)


def chown(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)


def utime(path: str, times: tuple[float, float] | None = None) -> None:
    # None means "now", which only needs write access; explicit times need ownership.
    os.utime(path, times)


def truncate(path: str, length: int) -> None:
    os.truncate(path, length)


def listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def setxattr(path: str, name: str, value: bytes, flags: int = 0) -> None:
    os.setxattr(path, name, value, flags)


def getxattr(path: str, name: str) -> bytes:
    return os.getxattr(path, name)


def listxattr(path: str) -> list[str]:
    return sorted(os.listxattr(path))


def removexattr(path: str, name: str) -> None:
    os.removexattr(path, name)


def mkfifo(path: str, mode: int = 0o666) -> None:
    os.mkfifo(path, mode)


def mknod(path: str, mode: int = 0o600, device: int = 0) -> None:
    os.mknod(path, mode, device)


def whoami() -> dict[str, Any]:
    """The agent's own credentials, to check that an agent is who it claims to be."""
    return {"uid": os.getresuid(), "gid": os.getresgid(), "groups": sorted(os.getgroups()),
            "umask": _get_umask()}


def _get_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def tree_state(root: str) -> dict[str, dict[str, Any]]:
    """Everything comparable about every object under root, keyed by relative path
    ("." is root itself): type, mode, uid, gid, nlink, size (not for directories,
    whose size is a filesystem detail), contents of regular files, symlink
    targets and user.* xattrs. Symlinks are never followed."""
    import stat as stat_mod  # local: this module's own stat() shadows the name

    out: dict[str, dict[str, Any]] = {}

    def visit(rel: str, path: str) -> None:
        st = os.lstat(path)
        kind = stat_mod.S_IFMT(st.st_mode)
        entry: dict[str, Any] = {
            "type": stat_mod.filemode(kind)[0], "mode": oct(stat_mod.S_IMODE(st.st_mode)),
            "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
        }
        if stat_mod.S_ISREG(kind):
            entry["size"] = st.st_size
            # No O_NOFOLLOW: lstat just said it is a regular file, and the walk
            # must not depend on how a filesystem treats that flag.
            fd = os.open(path, os.O_RDONLY)
            try:
                entry["data"] = os.read(fd, st.st_size + 1)
            finally:
                os.close(fd)
        elif stat_mod.S_ISLNK(kind):
            entry["target"] = os.readlink(path)
        if not stat_mod.S_ISLNK(kind):
            entry["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False)
                               for n in sorted(os.listxattr(path, follow_symlinks=False))
                               if n.startswith("user.")}
        out[rel] = entry
        if stat_mod.S_ISDIR(kind):
            for name in sorted(os.listdir(path)):
                visit(name if rel == "." else f"{rel}/{name}", os.path.join(path, name))

    visit(".", root)
    return out


def statvfs(path: str) -> dict[str, int]:
    """statvfs(2) fields (free counts move with any activity on the filesystem)."""
    sv = os.statvfs(path)
    return {name: getattr(sv, name) for name in (
        "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
        "f_favail", "f_namemax")}


def exec_status(path: str, timeout: float = 10.0) -> int:
    """Run path (no arguments) in a child process: its exit status. A refused
    execve() raises the OSError with its errno (subprocess reports it back)."""
    import subprocess

    return subprocess.run([path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=timeout, check=False).returncode


_libc.access.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.access.restype = ctypes.c_int


def access_errno(path: str, mode: int) -> None:
    """access(2) that reports why: returns None or raises OSError(errno), where
    os.access() would only say False. Agents have real == effective ids."""
    if _libc.access(os.fsencode(path), mode) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


# --- cache visibility and inode lifetime (test_cache_visibility, test_inodes) ---


def listdir_stat(path: str) -> list[tuple[str, tuple[str, int]]]:
    """What `ls -l` does: list path, then lstat each name in it. Sorted
    (name, ("ok", st_mode) or ("err", errno)) pairs; listing errors raise."""
    out: list[tuple[str, tuple[str, int]]] = []
    for name in sorted(os.listdir(path)):
        try:
            out.append((name, ("ok", os.lstat(os.path.join(path, name)).st_mode)))
        except OSError as e:
            out.append((name, ("err", e.errno or 0)))
    return out


def stat_count(path: str) -> int:
    """lstat every name in directory path, one by one; how many succeeded."""
    ok = 0
    for name in os.listdir(path):
        try:
            os.lstat(os.path.join(path, name))
            ok += 1
        except OSError:
            pass
    return ok


def stat_ino(path: str) -> int:
    """st_ino (lstat), to tell which file a name reaches; not for comparisons."""
    return os.lstat(path).st_ino


def stat_loop(path: str, seconds: float) -> list[tuple[int, int]]:
    """A timing probe, not for comparisons: lstat path back to back for `seconds`.
    One (CLOCK_MONOTONIC ns when the attempt started, 0 or errno) per attempt."""
    import time

    out: list[tuple[int, int]] = []
    end = time.monotonic_ns() + int(seconds * 1e9)
    while (start := time.monotonic_ns()) < end:
        try:
            os.lstat(path)
            out.append((start, 0))
        except OSError as e:
            out.append((start, e.errno or -1))
    return out


def chmod_timed(path: str, mode: int) -> int:
    """chmod; CLOCK_MONOTONIC ns right after it returned (pairs with stat_loop)."""
    import time

    os.chmod(path, mode)
    return time.monotonic_ns()


def rename_timed(src: str, dst: str) -> int:
    """rename; CLOCK_MONOTONIC ns right after it returned (pairs with stat_loop)."""
    import time

    os.rename(src, dst)
    return time.monotonic_ns()


def open_fd(path: str, flags: int = os.O_RDONLY) -> int:
    """Open path and keep it open in the agent (until close_fd); the fd number."""
    return os.open(path, flags)


def pread_fd(fd: int, size: int, offset: int = 0) -> bytes:
    return os.pread(fd, size, offset)


def fstat_fd(fd: int) -> dict[str, int]:
    """fstat of a held fd, with the same keys as stat()."""
    st = os.fstat(fd)
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "nlink": st.st_nlink}


def close_fd(fd: int) -> None:
    os.close(fd)


def pwrite(path: str, data: bytes, offset: int) -> int:
    """open(path, O_WRONLY), one pwrite at offset, close; bytes written."""
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def writes_with_append_toggled(path: str, flags: int, steps: list[list[Any]]) -> list[int]:
    """open(path, flags), then each step: ["write", bytes] (one write at the
    file offset), ["append", bool] (fcntl F_SETFL sets or clears O_APPEND),
    ["seek", offset]; close. The file offset after each step."""
    fd = os.open(path, flags)
    try:
        offsets = []
        for op, arg in steps:
            if op == "write":
                os.write(fd, arg)
            elif op == "append":
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL,
                            fl | os.O_APPEND if arg else fl & ~os.O_APPEND)
            else:
                os.lseek(fd, arg, os.SEEK_SET)
            offsets.append(os.lseek(fd, 0, os.SEEK_CUR))
        return offsets
    finally:
        os.close(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_caps(caps: list[int]) -> str:
    """Remove capabilities (by number: 0 chown, 1 dac_override, 2 dac_read_search,
    3 fowner, ...) from this agent's effective, permitted and inheritable sets,
    for good. Returns the CapEff line of /proc/self/status (hex) afterwards."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    for cap in caps:
        word, bit = divmod(cap, 32)
        for field in ("effective", "permitted", "inheritable"):
            setattr(data[word], field, getattr(data[word], field) & ~(1 << bit))
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("CapEff:"))


def getdents_names(path: str) -> list[str]:
    """Every name getdents64(2) returns, "." and ".." included, sorted."""
    libc = ctypes.CDLL(None, use_errno=True)
    nr_getdents64 = {"x86_64": 217, "aarch64": 61}[os.uname().machine]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    names: list[str] = []
    try:
        buf = ctypes.create_string_buffer(32768)
        while True:
            n = libc.syscall(nr_getdents64, fd, buf, len(buf))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            if n == 0:
                return sorted(names)
            off = 0
            while off < n:
                reclen = int.from_bytes(buf.raw[off + 16:off + 18], "little")
                raw = buf.raw[off + 19:off + reclen]
                names.append(raw[:raw.index(b"\0")].decode("utf-8", "surrogateescape"))
                off += reclen
    finally:
        os.close(fd)


# --- media provider: reads through filtered views (test_android_media) ---


def pread_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """One open, then pread(length, offset) for each (offset, length) in order."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, length, offset) for offset, length in ranges]
    finally:
        os.close(fd)


def mmap_ranges(path: str, ranges: list[tuple[int, int]], shared: bool) -> list[bytes]:
    """mmap the whole file read-only (MAP_SHARED or MAP_PRIVATE) and return the
    (offset, length) slices, each read from the mapping (page faults, not read())."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ)
        try:
            return [m[offset:offset + length] for offset, length in ranges]
        finally:
            m.close()
    finally:
        os.close(fd)


def sendfile_read(path: str, offset: int, count: int) -> bytes:
    """sendfile(2) count bytes from offset of path into a memfd; what arrived."""
    fd = os.open(path, os.O_RDONLY)
    out = os.memfd_create("sendfile")
    try:
        done = 0
        while done < count:
            n = os.sendfile(out, fd, offset + done, count - done)
            if n == 0:
                break
            done += n
        return os.pread(out, done, 0)
    finally:
        os.close(out)
        os.close(fd)


def copy_range(src: str, dst: str, offset: int, count: int) -> int:
    """copy_file_range(2) count bytes from offset of src to the start of dst
    (created, O_EXCL, 0o600); bytes copied."""
    fd = os.open(src, os.O_RDONLY)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            done = 0
            while done < count:
                n = os.copy_file_range(fd, out, count - done, offset + done, done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(out)
    finally:
        os.close(fd)


def run_output(argv: list[str], timeout: float = 120.0) -> tuple[int, bytes]:
    """Run argv (no stdin) as this agent: (exit status, stdout)."""
    import subprocess

    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                       check=False)
    return p.returncode, p.stdout


# --- hostile callers and faults (test_hostile, test_faults) ---


def chdir(path: str) -> None:
    """Make path this agent's cwd (kept for later calls with relative paths)."""
    os.chdir(path)


def lsetxattr(path: str, name: str, value: bytes) -> None:
    os.setxattr(path, name, value, follow_symlinks=False)


def lgetxattr(path: str, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def llistxattr(path: str) -> list[str]:
    return sorted(os.listxattr(path, follow_symlinks=False))


def lremovexattr(path: str, name: str) -> None:
    os.removexattr(path, name, follow_symlinks=False)


def lchown(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)


def fd_write(fd: int, data: bytes, offset: int = 0) -> int:
    """pwrite on a held fd (see open_fd)."""
    return os.pwrite(fd, data, offset)


def fd_truncate(fd: int, length: int) -> None:
    os.ftruncate(fd, length)


def fd_chmod(fd: int, mode: int) -> None:
    os.fchmod(fd, mode)


def fd_chown(fd: int, uid: int, gid: int) -> None:
    os.fchown(fd, uid, gid)


def fd_setxattr(fd: int, name: str, value: bytes) -> None:
    os.setxattr(fd, name, value)


def fd_utime_now(fd: int) -> None:
    os.utime(fd, None)


def fd_mmap_shared_write(fd: int) -> None:
    """mmap(MAP_SHARED, PROT_WRITE) a held fd: refused natively for a read-only fd."""
    import mmap

    mmap.mmap(fd, 1, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()


def fd_fsync(fd: int) -> None:
    os.fsync(fd)


def write_fsync(path: str, data: bytes) -> int:
    """Create/truncate path, write data, fsync, close; bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
        return done
    finally:
        os.close(fd)


def open_many(path: str, count: int) -> tuple[list[int], int]:
    """Open path count times and keep the fds: (fds opened, errno that stopped it
    or 0). For running a daemon out of descriptors; close them with close_fds."""
    fds: list[int] = []
    for _ in range(count):
        try:
            fds.append(os.open(path, os.O_RDONLY))
        except OSError as e:
            return fds, e.errno or -1
    return fds, 0


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def read_outcomes(paths: list[str], rounds: int) -> list[tuple[str, str, Any]]:
    """Read each path `rounds` times (for races): the distinct (path, "ok", data)
    or (path, "err", errno) outcomes seen, sorted."""
    seen: set[tuple[str, str, Any]] = set()
    for _ in range(rounds):
        for p in paths:
            try:
                with open(p, "rb") as f:
                    seen.add((p, "ok", f.read(4096)))
            except OSError as e:
                seen.add((p, "err", e.errno or 0))
    return sorted(seen, key=repr)


def listdir_outcomes(paths: list[str], rounds: int) -> list[tuple[str, str, Any]]:
    """Like read_outcomes, with sorted directory listings."""
    seen: set[tuple[str, str, Any]] = set()
    for _ in range(rounds):
        for p in paths:
            try:
                seen.add((p, "ok", tuple(sorted(os.listdir(p)))))
            except OSError as e:
                seen.add((p, "err", e.errno or 0))
    return sorted(seen, key=repr)


def lstat_each(paths: list[str]) -> list[tuple[str, int]]:
    """lstat each path in turn (no listing first): ("ok", st_mode) or ("err", errno)."""
    out: list[tuple[str, int]] = []
    for p in paths:
        try:
            out.append(("ok", os.lstat(p).st_mode))
        except OSError as e:
            out.append(("err", e.errno or 0))
    return out


def utime_ns(path: str, ns: tuple[int, int]) -> None:
    os.utime(path, ns=ns)


def mmap_write_close(path: str, offset: int, data: bytes) -> None:
    """Open read-write, write data through a shared mapping, unmap, close: no
    write(), no fsync, no msync."""
    import mmap

    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, offset + len(data), mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE)
        m[offset:offset + len(data)] = data
        m.close()
    finally:
        os.close(fd)


# --- passthrough (test_passthrough_hostile) ---


def fd_setfl(fd: int, flags: int) -> None:
    """fcntl(F_SETFL) on a held fd (O_APPEND, O_NONBLOCK, O_DIRECT, O_NOATIME)."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def fd_append(fd: int, data: bytes) -> int:
    """write() (not pwrite) on a held fd: at its offset, or at EOF with O_APPEND."""
    return os.write(fd, data)


def fallocate(path: str, mode: int, offset: int, length: int) -> dict[str, int]:
    """fallocate(2) on path opened read-write; size and 512-byte blocks after."""
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        st = os.fstat(fd)
        return {"size": st.st_size, "blocks_nonzero": int(st.st_blocks > 0)}
    finally:
        os.close(fd)


def odirect_write_read(path: str, data: bytes) -> bytes:
    """open(O_RDWR|O_DIRECT), write data (a multiple of 4096) from a page-aligned
    buffer at offset 0, read it back the same way; what was read."""
    import mmap

    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        os.pwritev(fd, [buf], 0)
        out = mmap.mmap(-1, len(data))
        n = os.preadv(fd, [out], 0)
        return bytes(out[:n])
    finally:
        os.close(fd)


def while_gone(path: str, other: str | None, data: bytes) -> tuple[bytes, int, int]:
    """Open path read-write, then rename it to other (or unlink it when None),
    then write data through the fd, mmap-read and read it back: (bytes, nlink,
    size)."""
    import mmap

    fd = os.open(path, os.O_RDWR)
    try:
        if other is None:
            os.unlink(path)
        else:
            os.rename(path, other)
        os.pwrite(fd, data, 0)
        st = os.fstat(fd)
        with mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            mapped = m[:]
        assert mapped == os.pread(fd, st.st_size, 0)
        return mapped, st.st_nlink, st.st_size
    finally:
        os.close(fd)


def mmap_fd_read(fd: int, size: int) -> bytes:
    """MAP_SHARED read-only mapping of a held fd: its first size bytes."""
    import mmap

    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return m[:size]


def open_read_close_each(paths: list[str]) -> int:
    """Open, read and close each path once; how many were read."""
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    return len(paths)


def churn(path: str, rounds: int, mode: str, size: int) -> list[tuple[str, Any]]:
    """Race helper: rounds times, open path and read (mode "r"), mmap-read
    ("m"), or write size bytes of one repeated byte at 0 ("w"); the distinct
    outcomes: ("ok", None) for a write, ("ok", bytes read) for reads,
    ("err", errno)."""
    import mmap

    seen: set[tuple[str, Any]] = set()
    for i in range(rounds):
        try:
            if mode == "w":
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, bytes((65 + i % 26,)) * size, 0)
                finally:
                    os.close(fd)
                seen.add(("ok", None))
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                if mode == "m":
                    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                        data = m[:size]
                else:
                    data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            seen.add(("ok", len(data)))
        except OSError as e:
            seen.add(("err", e.errno or 0))
    return sorted(seen, key=repr)


# --- plain readdir (test_readdir_plain) ---


def _getdents_chunk(fd: int, buf: Any) -> list[tuple[str, int, int]]:
    """One getdents64(2) call: its (name, d_ino, d_type) entries ([] at the end)."""
    nr_getdents64 = {"x86_64": 217, "aarch64": 61}[os.uname().machine]
    n = _libc.syscall(nr_getdents64, fd, buf, len(buf))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    raw, out, off = buf.raw[:n], [], 0
    while off < n:
        ino = int.from_bytes(raw[off:off + 8], "little")
        reclen = int.from_bytes(raw[off + 16:off + 18], "little")
        name = raw[off + 19:off + reclen]
        out.append((name[:name.index(b"\0")].decode("utf-8", "surrogateescape"), ino,
                    raw[off + 18]))
        off += reclen
    return out


def getdents_chunks(path: str, changes: list[tuple[str, str]] | None = None
                    ) -> list[list[tuple[str, int, int]]]:
    """Every entry getdents64(2) returns for directory path, "." and ".."
    included, as (name, d_ino, d_type), one list per call (32 KiB buffer, as
    glibc's readdir uses). d_ino is only for comparing with a listing of the
    same directory. changes: ("create" | "unlink", path) done, in order,
    right after the first call, while the listing is under way."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    chunks: list[list[tuple[str, int, int]]] = []
    try:
        buf = ctypes.create_string_buffer(32768)
        while True:
            chunk = _getdents_chunk(fd, buf)
            if not chunk:
                return chunks
            chunks.append(chunk)
            if len(chunks) == 1:
                for op, p in changes or ():
                    if op == "create":
                        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                    else:
                        os.unlink(p)
    finally:
        os.close(fd)


def lookup_fresh_until(directory: str, stop: str, seconds: float) -> int:
    """stat a name never asked for before in directory (a lookup the kernel
    cannot answer from its cache), again and again, until the file stop
    exists or seconds have passed; how many were made."""
    import time
    deadline = time.monotonic() + seconds
    n = 0
    while not os.path.exists(stop) and time.monotonic() < deadline:
        for _ in range(50):
            try:
                os.stat(os.path.join(directory, f"fresh-{os.getpid()}-{n}"))
            except FileNotFoundError:
                pass
            n += 1
    return n


def read_each(paths: list[str]) -> list[tuple[str, object]]:
    """Read each file in turn: ("ok", contents as text) or ("err", errno)."""
    out: list[tuple[str, object]] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                out.append(("ok", f.read().decode(errors="replace")))
        except OSError as e:
            out.append(("err", e.errno or 0))
    return out


def read_nonblock(path: str) -> bytes:
    """read, opened with O_NONBLOCK: a FIFO without a writer reads as empty
    instead of blocking the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = b""
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return out
    finally:
        os.close(fd)


# --- one directory, many callers at once (test_review21) ---


def hammer_dir(directory: str, names: list[str], rounds: int, seed: int
               ) -> dict[str, Any]:
    """rounds of a random mix in directory: a plain listing (os.listdir), a
    listing with a stat of every entry (readdirplus, then lookups/getattrs),
    stats of listed names and of names never there, reads. ENOENT for a
    name another agent made or removed meanwhile (names starting "tmp-") is
    expected; every other outcome is counted by kind, with each errno and
    each listed name that is neither in names nor a tmp- name."""
    import random
    rnd = random.Random(seed)
    out: dict[str, Any] = {"errors": {}, "strangers": set(), "listings": 0, "stats": 0}
    known = set(names)

    def err(kind: str, e: OSError) -> None:
        key = f"{kind}:{e.errno}"
        out["errors"][key] = out["errors"].get(key, 0) + 1

    for _ in range(rounds):
        pick = rnd.random()
        try:
            if pick < 0.25:
                listed = os.listdir(directory)
                out["listings"] += 1
                out["strangers"].update(n for n in listed
                                        if n not in known and not n.startswith("tmp-"))
            elif pick < 0.45:
                with os.scandir(directory) as it:
                    for e in it:
                        try:
                            e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            if not e.name.startswith("tmp-"):
                                raise
                        if e.name not in known and not e.name.startswith("tmp-"):
                            out["strangers"].add(e.name)
                out["listings"] += 1
            elif pick < 0.8:
                for n in rnd.sample(names, 20):
                    try:
                        os.stat(os.path.join(directory, n), follow_symlinks=False)
                    except PermissionError:
                        pass  # a mode that refuses this caller: as natively
                    out["stats"] += 1
            elif pick < 0.9:
                try:
                    os.stat(os.path.join(directory, f"absent-{rnd.randrange(50)}"))
                except FileNotFoundError:
                    pass
            else:
                n = rnd.choice(names)
                try:
                    with open(os.path.join(directory, n), "rb") as f:
                        f.read(64)
                except (PermissionError, IsADirectoryError):
                    pass
        except OSError as e:
            err("op", e)
    out["strangers"] = sorted(out["strangers"])
    return out


def churn_names(directory: str, rounds: int) -> int:
    """Make and remove tmp- names in directory, rounds times; errors raise."""
    for i in range(rounds):
        p = os.path.join(directory, f"tmp-{os.getpid()}-{i % 7}")
        if os.path.lexists(p):
            os.unlink(p)
        else:
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    return rounds
