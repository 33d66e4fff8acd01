"""fanotify(7) in file-handle mode, through libc: the calls and the event format.

Only what watch.py needs: a group reporting the object's and the parent
directory's file handles (plus the entry name), inode marks added and removed
by path, and a parser for the events read from the group's descriptor.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800

# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FILESYSTEM = 0x100

# events
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_ONDIR = 0x40000000

# info record types
_INFO_FID = 1
_INFO_DFID_NAME = 2
_INFO_DFID = 3

AT_EMPTY_PATH = 0x1000
_MAX_HANDLE_SZ = 128

_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BBH")  # info_type, pad, len
_FSID = 8
_HANDLE_HEADER = struct.Struct("=Ii")  # handle_bytes, handle_type


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


def init(flags: int) -> int:
    return _check(_libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC), "fanotify_init")


def mark(group: int, flags: int, mask: int, path: bytes) -> None:
    _check(_libc.fanotify_mark(group, flags, mask, -1, path), "fanotify_mark")


def handle_of(fd: int) -> bytes:
    """The file handle of what fd refers to, as fanotify reports it (type and
    bytes): the key events are matched by."""
    buf = ctypes.create_string_buffer(_HANDLE_HEADER.size + _MAX_HANDLE_SZ)
    _HANDLE_HEADER.pack_into(buf, 0, _MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH),
           "name_to_handle_at")
    size, kind = _HANDLE_HEADER.unpack_from(buf, 0)
    return struct.pack("=i", kind) + buf.raw[_HANDLE_HEADER.size:_HANDLE_HEADER.size + size]


@dataclass(slots=True)
class Event:
    mask: int
    pid: int
    obj: bytes | None = None  # the object's handle (FAN_REPORT_FID)
    parent: bytes | None = None  # its directory's handle (FAN_REPORT_DIR_FID)
    name: bytes | None = None  # the entry's name in that directory (FAN_REPORT_NAME)


def _handle(buf: bytes, at: int) -> tuple[bytes, int]:
    """A struct file_handle at buf[at:]: (type + bytes, offset just past it)."""
    size, kind = _HANDLE_HEADER.unpack_from(buf, at)
    start = at + _HANDLE_HEADER.size
    return struct.pack("=i", kind) + buf[start:start + size], start + size


def parse(buf: bytes, skip_pid: int = 0) -> list[Event]:
    """The events in buf, but those caused by skip_pid (an overflow is kept)."""
    events = []
    at = 0
    while at + _META.size <= len(buf):
        event_len, _vers, _res, meta_len, mask, fd, pid = _META.unpack_from(buf, at)
        if event_len < meta_len or at + event_len > len(buf):
            break  # cannot happen for a whole read; never loop forever on it
        if fd >= 0:  # not in file-handle mode; never expected
            os.close(fd)
        if pid == skip_pid and skip_pid and not mask & FAN_Q_OVERFLOW:
            at += event_len
            continue
        ev = Event(mask, pid)
        info = at + meta_len
        end = at + event_len
        while info + _INFO_HEADER.size <= end:
            kind, _pad, length = _INFO_HEADER.unpack_from(buf, info)
            if length < _INFO_HEADER.size:
                break
            body = info + _INFO_HEADER.size + _FSID
            if kind == _INFO_FID:
                ev.obj, _ = _handle(buf, body)
            elif kind in (_INFO_DFID_NAME, _INFO_DFID):
                ev.parent, name_at = _handle(buf, body)
                if kind == _INFO_DFID_NAME:
                    ev.name = buf[name_at:info + length].split(b"\0", 1)[0]
            info += length
        events.append(ev)
        at += event_len
    return events
