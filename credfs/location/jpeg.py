"""JPEG: walk the marker segments up to the image data and redact
APP1 Exif (GPS IFDs, see tiff.py), APP1 XMP and extended XMP (see xmp.py) and
the secondary images an APP2 MPF index points to (each is a JPEG of its own,
with its own Exif: gain maps, depth maps, multi-frame shots).

Any other APP1 segment is zeroed: it is vendor data we do not parse (or a
damaged Exif or XMP header that a lenient reader still accepts).

Failure handling: a segment this walk cannot follow (a missing marker, a
length running past the end) ends the walk and zeroes everything from that
segment to the end of the JPEG - an unfollowable chain could hide an Exif
segment from us that a lenient reader still finds. A broken Exif block is
zeroed whole; a broken XMP packet likewise.
"""

from __future__ import annotations

import struct

from ._source import Found, Malformed, Source
from .tiff import walk_tiff
from .xmp import xmp_location_spans

EXIF_HEADER = b"Exif\0"
XMP_NS = b"http://ns.adobe.com/xap/1.0/\0"
XMP_EXT_NS = b"http://ns.adobe.com/xmp/extension/\0"
MPF_HEADER = b"MPF\0"

MAX_DEPTH = 3  # primary image -> thumbnail / MPF image -> its thumbnail
MAX_SEGMENTS = 10_000
MAX_EXTENDED_XMP = 16 << 20

_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def scan_jpeg(src: Source, found: Found, start: int, length: int, depth: int) -> None:
    """Redact the JPEG at [start, start+length). Never raises Malformed."""
    if depth > MAX_DEPTH or src.read(start, 2) != b"\xff\xd8":
        return  # too deep, or not a JPEG (a thumbnail may be anything)
    end = start + length
    pos = start + 2
    extended: dict[bytes, list[tuple[int, int, int, int]]] = {}  # guid -> chunks
    try:
        for _ in range(MAX_SEGMENTS):
            hdr = src.read(pos, 4) if pos < end else b""
            if len(hdr) < 2:
                break  # the end: nothing more to read
            if hdr[0] != 0xFF:
                raise Malformed(f"no JPEG marker at {pos}")
            marker = hdr[1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker in _STANDALONE:
                pos += 2
                continue
            if marker == 0xD9:  # EOI
                break
            if len(hdr) < 4:
                raise Malformed(f"JPEG segment header at {pos} is truncated")
            seg_end = pos + 2 + struct.unpack(">H", hdr[2:4])[0]
            if seg_end < pos + 4 or seg_end > end:
                raise Malformed(f"JPEG segment at {pos} runs past the end")
            if marker == 0xDA:  # start of scan: readers take no metadata after it
                break
            if marker == 0xE1:
                _app1(src, found, pos + 4, seg_end, depth, extended)
            elif marker == 0xE2:
                _app2(src, found, pos + 4, seg_end, depth)
            pos = seg_end
        else:
            raise Malformed(f"more than {MAX_SEGMENTS} JPEG segments")
    except Malformed:
        found.zero(pos, end)
    _extended_xmp(src, found, extended)


def _app1(src: Source, found: Found, start: int, end: int, depth: int,
          extended: dict[bytes, list[tuple[int, int, int, int]]]) -> None:
    head = src.read(start, 80)
    if head.startswith(EXIF_HEADER):
        base = start + 6
        try:
            walk_tiff(src, found, base, end - base, depth, scan_jpeg)
        except Malformed:
            found.zero(base, end)
    elif head.startswith(XMP_NS):
        base = start + len(XMP_NS)
        try:
            for s, e in xmp_location_spans(src.read(base, end - base)):
                found.blank(base + s, base + e)
        except Malformed:
            found.zero(base, end)
    elif head.startswith(XMP_EXT_NS):
        # GUID (32 hex digits), full length, this chunk's offset, then the data
        base = start + len(XMP_EXT_NS)
        if end - base < 40:
            found.zero(base, end)
            return
        guid = head[len(XMP_EXT_NS) : len(XMP_EXT_NS) + 32]
        full, offset = struct.unpack(">II", src.exact(base + 32, 8))
        extended.setdefault(guid, []).append((base + 40, end - base - 40, full, offset))
    else:
        # Anything else in APP1 is vendor data we do not parse - or XMP under a
        # damaged header, which exiftool still reads (it takes any APP1 that starts
        # with "http" or holds "<exif:" or "<?xpacket"), or a TIFF block
        # (Parrot). Not parsed means not known to be free of location: zeroed.
        found.zero(start, end)


def _extended_xmp(src: Source, found: Found,
                  extended: dict[bytes, list[tuple[int, int, int, int]]]) -> None:
    """Reassemble each extended XMP packet; map its location spans back to the chunks."""
    for chunks in extended.values():
        try:
            full = chunks[0][2]
            if full > MAX_EXTENDED_XMP or any(c[2] != full for c in chunks):
                raise Malformed("extended XMP too large or inconsistent")
            buf = bytearray(full)  # a gap stays NUL, which xmp_location_spans refuses
            pieces = []
            for fstart, n, _, voff in chunks:
                if voff + n > full:
                    raise Malformed("extended XMP chunk beyond its packet")
                buf[voff : voff + n] = src.exact(fstart, n)
                pieces.append((voff, fstart, n))
            for s, e in xmp_location_spans(bytes(buf)):
                for voff, fstart, n in pieces:  # a property may straddle chunks
                    lo, hi = max(s, voff), min(e, voff + n)
                    if lo < hi:
                        found.blank(fstart + lo - voff, fstart + hi - voff)
        except Malformed:
            for fstart, n, _, _ in chunks:
                found.zero(fstart, fstart + n)


def _app2(src: Source, found: Found, start: int, end: int, depth: int) -> None:
    """MPF: scan the secondary images its MP entries point to."""
    if src.read(start, 4) != MPF_HEADER:
        return
    base = start + 4  # offsets in MPF are relative to its TIFF header
    try:
        for off, size in _mp_entries(src, base, end - base):
            if off:  # the primary image is entry 0 with offset 0
                scan_jpeg(src, found, base + off, min(size, src.size - base - off), depth + 1)
    except Malformed:
        # An unreadable index hides where the other images are: zero the index, and
        # every image after this JPEG stays unknown to readers that follow it.
        found.zero(start, end)


def _mp_entries(src: Source, base: int, length: int) -> list[tuple[int, int]]:
    head = src.exact(base, 8)
    bo = {b"II": "<", b"MM": ">"}.get(head[:2])
    if bo is None:
        raise Malformed(f"no TIFF header in MPF at {base}")
    ifd = struct.unpack(bo + "I", head[4:8])[0]
    if ifd + 2 > length:
        raise Malformed(f"MPF IFD outside its segment at {base}")
    count = struct.unpack(bo + "H", src.exact(base + ifd, 2))[0]
    if ifd + 2 + 12 * count > length:
        raise Malformed(f"MPF IFD overruns its segment at {base}")
    entries = src.exact(base + ifd + 2, 12 * count)
    out = []
    for i in range(count):
        tag, typ, n, val = struct.unpack_from(bo + "HHII", entries, 12 * i)
        if tag == 0xB002 and typ == 7 and n % 16 == 0 and n > 4:
            if val + n > length or n > 16 * 64:
                raise Malformed(f"MP entries outside their segment at {base}")
            data = src.exact(base + val, n)
            for k in range(n // 16):
                _, size, off = struct.unpack_from(bo + "III", data, 16 * k)
                out.append((off, size))
    return out
