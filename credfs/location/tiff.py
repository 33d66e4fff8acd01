"""Exif/TIFF: find the GPS IFDs in a TIFF structure and zero them.

The TIFF block starts with its header ("II*\\0" or "MM\\0*") at `base`; every
offset inside is relative to base and must stay within `length` bytes (an Exif
APP1 segment, or a whole TIFF file). What is zeroed for each GPS IFD: its
entry count, all its 12-byte entries (tags, types, counts, inline values), its
next-IFD pointer and every out-of-line value an entry points to. The GPSInfo
pointer tag (0x8825) in the IFD that links to it is kept: it carries no
location, and keeping it leaves that IFD valid for every reader (it points to
an empty GPS IFD). GPSInfo pointers are followed in every IFD reached (IFD0,
the IFD chain, Exif, Interop and SubIFDs), and the thumbnail IFD's embedded
JPEG is scanned too (it can carry Exif of its own). An XMP packet in tag 700
(XMLPacket) is redacted as in xmp.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ._source import Found, LimitExceeded, Malformed, Source
from .xmp import xmp_location_spans

GPS_IFD = 0x8825
EXIF_IFD = 0x8769
INTEROP_IFD = 0xA005
SUB_IFDS = 0x014A
THUMB_OFFSET = 0x0201
THUMB_LENGTH = 0x0202
XMP_PACKET = 0x02BC  # XMP in a TIFF (and, rarely, in Exif)
MAX_XMP = 4 << 20

# Byte size of one value of each TIFF type (6.0 plus the Exif IFD type 13).
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
# Integer types a pointer may be read as: exiftool follows a GPSInfo pointer
# whatever its declared type, so we read any integer type and refuse the rest.
_INT_FORMATS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I"}
POINTERS = (GPS_IFD, EXIF_IFD, INTEROP_IFD, SUB_IFDS, THUMB_OFFSET, THUMB_LENGTH)

MAX_IFDS = 256  # real files have 2-6; more is a loop or an attack

EmbeddedJpeg = Callable[[Source, Found, int, int, int], None]


def is_tiff_header(head: bytes) -> bool:
    return head[:4] in (b"II*\0", b"MM\0*")


def walk_tiff(src: Source, found: Found, base: int, length: int, depth: int,
              embedded_jpeg: EmbeddedJpeg | None = None, check_magic: bool = True) -> None:
    """Zero every GPS IFD of the TIFF block [base, base+length). Malformed if broken."""
    head = src.exact(base, 8) if length >= 8 else b""
    if len(head) < 8:
        raise Malformed(f"TIFF header at {base} is truncated")
    if head[:2] == b"II":
        bo = "<"
    elif head[:2] == b"MM":
        bo = ">"
    else:
        raise Malformed(f"no TIFF byte order mark at {base}")
    magic, first = struct.unpack(bo + "HI", head[2:8])
    if magic != 42 and check_magic:  # BigTIFF (43) and others: not understood, fail closed
        raise Malformed(f"TIFF magic {magic} at {base} is not 42")

    def u16(b: bytes, o: int) -> int:
        return struct.unpack_from(bo + "H", b, o)[0]

    def u32(b: bytes, o: int) -> int:
        return struct.unpack_from(bo + "I", b, o)[0]

    def within(off: int, n: int) -> bool:
        return 0 <= off and n >= 0 and off + n <= length

    queue: list[tuple[int, bool]] = [(first, False)]  # (offset, is a GPS IFD)
    seen: set[tuple[int, bool]] = set()
    thumb_off = thumb_len = None
    while queue:
        off, is_gps = queue.pop()
        if off == 0:
            continue
        if (off, is_gps) in seen:  # a loop; an IFD reached as GPS and not is done twice
            continue
        seen.add((off, is_gps))
        if len(seen) > MAX_IFDS:
            raise LimitExceeded(f"more than {MAX_IFDS} IFDs in the TIFF block at {base}")
        if not within(off, 2):
            raise Malformed(f"IFD offset {off} outside the TIFF block at {base}")
        count = u16(src.exact(base + off, 2), 0)
        ifd_len = 2 + 12 * count + 4
        if not within(off, ifd_len):
            raise Malformed(f"IFD at {base + off} with {count} entries overruns its block")
        ifd = src.exact(base + off, ifd_len)
        if is_gps:
            found.zero(base + off, base + off + ifd_len)
        for i in range(count):
            e = 2 + 12 * i
            tag, typ, n = struct.unpack_from(bo + "HHI", ifd, e)
            size = TYPE_SIZES.get(typ, 0) * n
            if is_gps:
                if size > 4:  # the value lives elsewhere in the block
                    voff = u32(ifd, e + 8)
                    if not within(voff, size):
                        raise Malformed(f"GPS value at {base + voff} overruns its block")
                    found.zero(base + voff, base + voff + size)
                continue
            if tag in POINTERS and n and typ not in _INT_FORMATS:
                raise Malformed(f"IFD pointer tag {tag:#x} of type {typ} at {base + off}")
            if tag in (GPS_IFD, EXIF_IFD, INTEROP_IFD, SUB_IFDS) and n:
                for ptr in _ints(src, ifd, e, bo, typ, n, base, within):
                    queue.append((ptr, tag == GPS_IFD))
            elif tag == XMP_PACKET and size:
                _xmp(src, found, base, ifd, e, bo, size, within)
            elif tag == THUMB_OFFSET and n == 1:
                thumb_off = _ints(src, ifd, e, bo, typ, 1, base, within)[0]
            elif tag == THUMB_LENGTH and n == 1:
                thumb_len = _ints(src, ifd, e, bo, typ, 1, base, within)[0]
        # The next IFD in the chain. Behind a GPS IFD there is none in real files;
        # whatever an attacker links there is treated as GPS too.
        queue.append((u32(ifd, ifd_len - 4), is_gps))
    if embedded_jpeg and thumb_off and thumb_len and within(thumb_off, thumb_len):
        embedded_jpeg(src, found, base + thumb_off, thumb_len, depth + 1)


def _ints(src: Source, ifd: bytes, e: int, bo: str, typ: int, n: int, base: int,
          within: Callable[[int, int], bool]) -> list[int]:
    """The n integer values of the entry at ifd[e:e+12] (inline or out of line)."""
    fmt = _INT_FORMATS[typ]
    size = TYPE_SIZES[typ] * n
    if n > MAX_IFDS:
        raise LimitExceeded(f"an IFD pointer tag with {n} values in the TIFF block at {base}")
    if size <= 4:
        data = ifd[e + 8 : e + 8 + size]
    else:
        voff = struct.unpack_from(bo + "I", ifd, e + 8)[0]
        if not within(voff, size):
            raise Malformed(f"IFD pointer values at {base + voff} overrun their block")
        data = src.exact(base + voff, size)
    return [v & 0xFFFFFFFF for v in struct.unpack(bo + fmt * n, data)]


def _xmp(src: Source, found: Found, base: int, ifd: bytes, e: int, bo: str, size: int,
         within: Callable[[int, int], bool]) -> None:
    """Blank the location properties of an XMP packet held in a TIFF tag."""
    start = base + e + 8 if size <= 4 else base + struct.unpack_from(bo + "I", ifd, e + 8)[0]
    if size > 4 and not within(start - base, size):
        raise Malformed(f"XMP tag value at {start} overruns its TIFF block")
    try:
        if size > MAX_XMP:
            raise Malformed(f"XMP tag value at {start} larger than {MAX_XMP} bytes")
        for s, e2 in xmp_location_spans(src.exact(start, size)):
            found.blank(start + s, start + e2)
    except Malformed:
        found.zero(start, start + size)
