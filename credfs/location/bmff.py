"""ISO BMFF / QuickTime (MP4, MOV, 3GP, M4A): walk the box tree and redact
location boxes, without reading media data (only box headers and metadata).

Zeroed (payload bytes only; box headers stay, so the tree stays walkable):
- udta '©xyz' (ISO 6709 string: Android's MediaRecorder, ffmpeg's "location",
  iPhone 3GS) and '@xyz': the whole payload (length, language and text);
- udta 'loci' (3GPP location: name, role, coordinates, body, notes): all but
  its version/flags;
- 'GPS ' / 'gps ' (dashcam GPS index boxes): the whole payload;
- ilst items in a QuickTime 'meta' whose 'keys' name a location key (any key
  containing "location" or "gps", e.g. com.apple.quicktime.location.ISO6709,
  .location.name, .location.accuracy.horizontal), iTunes-style '©xyz' items,
  and '----' items whose name says location: the value of each 'data' box
  (after its type and locale words);
- XMP packets in a top-level 'uuid' (BE7ACFCB-...) box or a udta 'XMP_' box:
  location properties as in xmp.py.

Failure handling: a box that runs past its parent, a size below its header,
or trailing bytes that are not a box in a container zero that container's
payload (a metadata container loses only metadata; a broken moov loses the
movie, which no reader could play reliably anyway). At the top level the file
is zeroed from the broken box to its end. A box reaching past the end of the
file at the top level is taken as a truncated file (an interrupted recording)
and clamped.
"""

from __future__ import annotations

import struct

from ._source import Found, Malformed, Source
from .xmp import xmp_location_spans

CONTAINERS = frozenset(
    b.encode() for b in ("moov", "trak", "mdia", "minf", "udta", "edts", "moof", "traf",
                         "mvex", "meco", "tref")
)
LOCATION_BOXES = frozenset((b"\xa9xyz", b"@xyz", b"GPS ", b"gps "))
TOP_LEVEL = frozenset(
    b.encode() for b in ("ftyp", "moov", "mdat", "free", "skip", "wide", "pnot", "uuid",
                         "styp", "sidx", "moof", "pdin")
)
XMP_UUID = bytes.fromhex("BE7ACFCB97A942E89C71999491E3AFAC")
QT_META_CHILDREN = frozenset((b"hdlr", b"keys", b"ilst", b"free", b"uuid", b"mhdr", b"ctry",
                              b"lang"))

MAX_DEPTH = 16
MAX_XMP = 4 << 20
MAX_KEYS = 10_000


def looks_like_bmff(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] in TOP_LEVEL


def is_box_chain(src: Source, max_boxes: int = 64) -> bool:
    """Whether the file is a chain of top-level boxes, one of a known type."""
    known = False
    try:
        for n, (_, typ, _, _, _) in enumerate(_boxes(src, 0, src.size, 0)):
            if n >= max_boxes:
                return False
            known = known or typ in TOP_LEVEL
    except Malformed:
        return False
    return known


def scan_bmff(src: Source, found: Found) -> None:
    _walk(src, found, 0, src.size, 0, b"", frozenset())


def _boxes(src: Source, start: int, end: int, depth: int):
    """Yield (type, payload start, box end, usertype) for each child box in [start, end)."""
    pos = start
    while pos < end:
        if end - pos < 8:  # QuickTime ends some containers with a 32-bit zero
            if any(src.read(pos, end - pos)):
                raise Malformed(f"{end - pos} stray bytes at {pos} at the end of a box")
            return
        size, typ = struct.unpack(">I4s", src.exact(pos, 8))
        hlen = 8
        if size == 1:
            size = struct.unpack(">Q", src.exact(pos + 8, 8))[0]
            hlen = 16
        elif size == 0:  # extends to the end of its parent (or of the file)
            size = end - pos
        if size < hlen:
            raise Malformed(f"box {typ!r} at {pos} has size {size}")
        box_end = pos + size
        if box_end > end:
            if depth:
                raise Malformed(f"box {typ!r} at {pos} runs past its parent")
            box_end = end  # a truncated file: take what is there
        usertype = b""
        if typ == b"uuid":
            usertype = src.read(pos + hlen, 16)
            hlen += 16
        yield pos, typ, min(pos + hlen, box_end), box_end, usertype
        pos = box_end


def _walk(src: Source, found: Found, start: int, end: int, depth: int, parent: bytes,
          location_keys: frozenset[int]) -> None:
    if depth > MAX_DEPTH:
        raise Malformed(f"boxes nested deeper than {MAX_DEPTH} at {start}")
    it = _boxes(src, start, end, depth)
    next_pos = start  # where the box being read starts
    while True:
        try:
            box = next(it, None)
        except Malformed:
            if depth == 0:  # nothing after this point can be trusted
                found.zero(next_pos, end)
                return
            raise
        if box is None:
            return
        _, typ, payload, box_end, usertype = box
        next_pos = box_end
        if parent == b"ilst":
            index = struct.unpack(">I", typ)[0]
            if typ in LOCATION_BOXES or index in location_keys:
                _zero_item_values(src, found, payload, box_end, depth)
            elif typ == b"----":
                _freeform(src, found, payload, box_end, depth)
        elif typ in LOCATION_BOXES:
            found.zero(payload, box_end)
        elif typ == b"loci":
            found.zero(payload + 4, box_end)
        elif (typ == b"uuid" and usertype == XMP_UUID) or (typ == b"XMP_" and parent == b"udta"):
            _xmp(src, found, payload, box_end)
        elif typ in CONTAINERS or typ == b"meta" or typ == b"ilst":
            try:
                if typ == b"meta":
                    _meta(src, found, payload, box_end, depth)
                else:
                    _walk(src, found, payload, box_end, depth + 1, typ, location_keys)
            except Malformed:
                found.zero(payload, box_end)


def _meta(src: Source, found: Found, payload: int, end: int, depth: int) -> None:
    # ISO 'meta' is a full box (version and flags first); QuickTime's is not.
    peek = src.read(payload, 8)
    if peek[4:8] not in QT_META_CHILDREN:
        payload += 4
    keys: frozenset[int] = frozenset()
    for _, typ, p, e, _ in _boxes(src, payload, end, depth + 1):  # keys may follow ilst
        if typ == b"keys":
            keys = keys | _location_keys(src, p, e)
    _walk(src, found, payload, end, depth + 1, b"meta", keys)


def _location_keys(src: Source, start: int, end: int) -> frozenset[int]:
    """1-based indexes of the location keys in a QuickTime 'keys' box."""
    data = src.exact(start, end - start) if end - start <= MAX_XMP else b""
    if len(data) < 8:
        raise Malformed(f"'keys' box at {start} is too short or too large")
    # The entry count is not trusted: exiftool reads entries to the end of the
    # box whatever the count says, and so do we.
    out, off, i = set(), 8, 0
    while off < len(data):
        i += 1
        if i > MAX_KEYS or off + 8 > len(data):
            raise Malformed(f"'keys' entry {i} at {start + off} is truncated or one too many")
        size = struct.unpack_from(">I", data, off)[0]
        if size < 8 or off + size > len(data):
            raise Malformed(f"'keys' entry {i} at {start + off} has size {size}")
        name = data[off + 8 : off + size].lower()
        if b"location" in name or b"gps" in name:
            out.add(i)
        off += size
    return frozenset(out)


def _zero_item_values(src: Source, found: Found, start: int, end: int, depth: int) -> None:
    """Zero the values of the 'data' boxes of one ilst item (all of it if broken)."""
    try:
        for _, typ, p, e, _ in _boxes(src, start, end, depth + 1):
            if typ == b"data":
                found.zero(p + 8, e)  # keep the type indicator and locale
            elif typ not in (b"mean", b"name", b"itif"):
                found.zero(p, e)  # unknown payload in a location item: zero it too
    except Malformed:
        found.zero(start, end)


def _freeform(src: Source, found: Found, start: int, end: int, depth: int) -> None:
    try:
        for _, typ, p, e, _ in _boxes(src, start, end, depth + 1):
            if typ == b"name":
                name = src.read(p, min(e - p, 4096)).lower()
                if b"location" in name or b"gps" in name:
                    _zero_item_values(src, found, start, end, depth)
                return
    except Malformed:
        found.zero(start, end)


def _xmp(src: Source, found: Found, start: int, end: int) -> None:
    try:
        if end - start > MAX_XMP:
            raise Malformed(f"XMP box at {start} larger than {MAX_XMP} bytes")
        for s, e in xmp_location_spans(src.read(start, end - start)):
            found.blank(start + s, start + e)
    except Malformed:
        found.zero(start, end)
