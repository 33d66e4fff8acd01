"""Find the bytes of a media file that carry location, by byte range.

    location_ranges(fd, size) -> ((start, end), ...)        # what changes
    find_redactions(fd, size) -> ((start, end, fill), ...)  # and with which byte

The file is read only with os.pread on the given descriptor, never by path.
Formats: JPEG (Exif GPS IFDs, XMP, extended XMP, thumbnails, MPF images),
TIFF (its GPS IFDs), ISO BMFF / QuickTime (MP4, MOV, 3GP: see bmff.py).
Anything else yields no ranges. Binary location data is replaced by zeros;
XMP properties by spaces (xmp.py says why). The size never changes.

Why a parser of our own: it runs inside the FUSE daemon on every new version
of every file a redacted caller opens, on files written by anyone, so it must
give absolute byte offsets for *every* byte that carries location (GPS IFD
entries, out-of-line values, XMP properties, box payloads) and do bounded
work on hostile input. Of the maintained libraries evaluated: exifread gives
value offsets relative to the TIFF header but not the IFD entries, and covers
neither XMP nor MP4; piexif and pymediainfo give no offsets at all; hachoir
gives absolute offsets for every field of JPEG, Exif and MP4, but decodes the
whole JPEG entropy stream to reach the end, builds an object per field, and
"autofixes" broken structures in its own way - on a hostile file its view can
differ from exiftool's exactly where it matters. The formats' location parts
are small and well specified; the code here is ~600 lines with explicit limits.

Malformed input - fail closed. A structure the parsers cannot follow (a
truncated or looping IFD, an absurd count or offset, a box running past its
parent, boxes nested too deep, a read budget exhausted) is zeroed *whole*:
the Exif block, the XMP packet, the container box, or - when the outermost
chain itself breaks - everything from there to the end of the file. Returning
only the ranges found before the break would be unsafe: a file crafted so
that our parser stops early (or a camera bug) while a lenient reader such as
exiftool skips the anomaly and reads on would hand that reader its GPS. The
price is that a reader of a malformed file may lose other metadata of that
block (or, for a broken outer structure, the rest of the file); the owner and
readers with ACCESS_MEDIA_LOCATION still get the file unchanged. An
unexpected exception (a bug here) zeroes the whole file for the same reason.
"""

from __future__ import annotations

import logging
import re

from ._source import SPACE, ZERO, Found, Malformed, Source, normalize
from .bmff import is_box_chain, looks_like_bmff, scan_bmff
from .jpeg import scan_jpeg
from .tiff import is_tiff_header, walk_tiff

__all__ = ["SPACE", "ZERO", "find_redactions", "location_ranges"]

log = logging.getLogger(__name__)

Redactions = tuple[tuple[int, int, int], ...]


def find_redactions(fd: int, size: int) -> Redactions:
    """Sorted, non-overlapping (start, end, fill byte) spans to overwrite."""
    found = Found(size)
    try:
        _scan(Source(fd, size), found)
    except Malformed:  # only the outermost structure can still raise
        pass
    except Exception as e:  # a bug must not turn into a leak or a dead worker
        log.error("location: unexpected %s while scanning fd %d: %s; redacting the whole file",
                  type(e).__name__, fd, e)
        return ((0, size, ZERO),) if size > 0 else ()
    return normalize(found.spans)


def location_ranges(fd: int, size: int) -> tuple[tuple[int, int], ...]:
    """Sorted, merged (start, end) ranges of every byte a redacted read changes."""
    out: list[tuple[int, int]] = []
    for s, e, _ in find_redactions(fd, size):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return tuple(out)


# exiftool's last resort for a file it cannot identify: a JPEG or TIFF header
# anywhere in its first KiB. A reader that does that must not find GPS we missed.
_EMBEDDED = re.compile(rb"\xff\xd8\xff|MM\0\x2a|II\x2a\0")
_SNIFF = 1024


def _scan(src: Source, found: Found) -> None:
    head = src.read(0, _SNIFF)
    if head.startswith(b"\xff\xd8\xff"):
        scan_jpeg(src, found, 0, src.size, 0)
    elif is_tiff_header(head):
        _tiff(src, found, 0)
    elif looks_like_bmff(head) or is_box_chain(src):
        # The second test: a damaged first box type does not stop a reader that
        # goes by the file name (exiftool does); a clean chain of boxes holding
        # a known top-level box is a movie whatever its first four letters.
        scan_bmff(src, found)
    elif m := _EMBEDDED.search(head):
        if m.group() == b"\xff\xd8\xff":
            scan_jpeg(src, found, m.start(), src.size - m.start(), 0)
        else:
            _tiff(src, found, m.start())
    elif head[:2] in (b"II", b"MM"):
        # A TIFF with a damaged magic number, which exiftool still reads when the
        # name ends in .tif. We cannot tell it from a file that merely starts with
        # those letters, so only a walk that succeeds counts (a gap: see README).
        attempt = Found(src.size)
        try:
            walk_tiff(src, attempt, 0, src.size, 0, scan_jpeg, check_magic=False)
        except Malformed:
            return
        found.spans.extend(attempt.spans)


def _tiff(src: Source, found: Found, base: int) -> None:
    try:
        walk_tiff(src, found, base, src.size - base, 0, scan_jpeg)
    except Malformed:
        found.zero(base, src.size)
