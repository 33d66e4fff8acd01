"""XMP packets: find location properties and blank them with spaces.

A location property is blanked whole - from the '<' of its start tag to the
'>' of its end tag, or the whole `name="value"` attribute - with spaces (0x20)
rather than zeros. XML allows whitespace between elements and between
attributes, so the packet stays well-formed and the property is simply gone
for every reader; NUL bytes are not allowed anywhere in XML, and a strict
parser (expat: Python's ElementTree, Pillow's getxmp, Android's
XmlPullParser) then rejects the whole packet and loses every other property,
e.g. a motion photo's or an Ultra HDR gain map's description. exiftool
accepts either. The file size never changes.

Properties are matched by local name whatever the namespace prefix (the prefix
is the writer's choice; exiftool matches by namespace URI): every name that
starts with "GPS" (any case: exif:GPSLatitude ... exif:GPSDestDistance,
DJI's drone-dji:GpsLatitude) and the textual location properties of
photoshop (City, State, Country), IPTC Core (Location, CountryCode) and IPTC
Extension (LocationCreated, LocationShown and their fields), plus plain
Latitude/Longitude/Altitude/AbsoluteAltitude. Blanking an unrelated property
of the same local name in another namespace loses nothing private.

The scanner is a small strict tokenizer, not a validating parser: anything it
does not follow (a DOCTYPE, mismatched or unclosed tags, NUL bytes as in
UTF-16 packets, '<' inside an attribute value) raises Malformed, and the
caller zeroes the whole packet (fail closed: a construct we misread could hide
a property from us but not from a lenient reader). Comments are blanked too:
they carry no data, and a lenient reader might read a property inside one.
"""

from __future__ import annotations

import re

from ._source import Malformed

LOCATION_LOCAL_NAMES = frozenset(
    n.lower().encode()
    for n in (
        # photoshop: (legacy IPTC in XMP)
        "City", "State", "Country",
        # Iptc4xmpCore:
        "Location", "CountryCode",
        # Iptc4xmpExt: LocationCreated / LocationShown structures and their fields
        "LocationCreated", "LocationShown", "LocationName", "LocationId", "Sublocation",
        "ProvinceState", "CountryName", "WorldRegion",
        # generic coordinates (e.g. drone-dji:AbsoluteAltitude, Camera:Latitude)
        "Latitude", "Longitude", "Altitude", "AbsoluteAltitude", "RelativeAltitude",
    )
)

_NAME = re.compile(rb"[^\s/>=<\"']+")
_SPACE = re.compile(rb"\s*")


def is_location_name(qname: bytes) -> bool:
    local = qname.rsplit(b":", 1)[-1].lower()
    return local.startswith(b"gps") or local in LOCATION_LOCAL_NAMES


def xmp_location_spans(data: bytes) -> list[tuple[int, int]]:
    """Offsets (relative to data) of every location property and comment.

    Raises Malformed when the packet is not XML this tokenizer can follow.
    """
    if b"\0" in data:
        raise Malformed("NUL bytes in an XMP packet (UTF-16/32 or not XML)")
    spans: list[tuple[int, int]] = []
    stack: list[tuple[bytes, int, bool]] = []  # (name, offset of '<', is a location property)
    i, n = 0, len(data)
    while True:
        lt = data.find(b"<", i)
        if lt < 0:
            break
        if data.startswith(b"<!--", lt):
            end = _find(data, b"-->", lt + 4) + 3
            spans.append((lt, end))
        elif data.startswith(b"<![CDATA[", lt):
            if not stack:
                raise Malformed("CDATA outside any element in an XMP packet")
            end = _unbroken(data, b"]]>", lt + 9) + 3
        elif data.startswith(b"<?", lt):
            end = _unbroken(data, b"?>", lt + 2) + 2
        elif data.startswith(b"<!", lt):
            raise Malformed("DOCTYPE or declaration in an XMP packet")
        elif data.startswith(b"</", lt):
            gt = _find(data, b">", lt + 2)
            name = data[lt + 2 : gt].strip()
            if not stack or stack[-1][0] != name:
                raise Malformed(f"end tag {name[:40]!r} does not match its start tag in XMP")
            _, start, is_loc = stack.pop()
            if is_loc:
                spans.append((start, gt + 1))
            end = gt + 1
        else:
            end, name, self_closing = _start_tag(data, lt, spans)
            is_loc = is_location_name(name)
            if self_closing:
                if is_loc:
                    spans.append((lt, end))
            else:
                stack.append((name, lt, is_loc))
                if len(stack) > 256:
                    raise Malformed("XMP elements nested deeper than 256")
        i = end
        if i > n:
            raise Malformed("XMP packet ends inside markup")
    if stack:
        raise Malformed(f"XMP element {stack[-1][0][:40]!r} is never closed")
    return spans


def _find(data: bytes, what: bytes, start: int) -> int:
    at = data.find(what, start)
    if at < 0:
        raise Malformed(f"unterminated markup in XMP (no {what!r})")
    return at


def _unbroken(data: bytes, what: bytes, start: int) -> int:
    """_find for a PI or CDATA end, refusing a '<' before it: XML allows one
    there, but a damaged terminator would make us skip properties up to some
    later terminator that a lenient reader parses."""
    at = _find(data, what, start)
    if b"<" in data[start:at]:
        raise Malformed(f"'<' inside a processing instruction or CDATA at {start} in XMP")
    return at


def _start_tag(data: bytes, lt: int, spans: list[tuple[int, int]]) -> tuple[int, bytes, bool]:
    """Parse the start tag at lt; blank its location attributes. -> (end, name, self-closing)."""
    m = _NAME.match(data, lt + 1)
    if not m:
        raise Malformed(f"bad start tag at {lt} in XMP")
    name, j = m.group(), m.end()
    while True:
        after_space = _SPACE.match(data, j).end()
        spaced, j = after_space > j, after_space
        if data.startswith(b"/>", j):
            return j + 2, name, True
        if data.startswith(b">", j):
            return j + 1, name, False
        m = _NAME.match(data, j)
        if not m or not spaced:  # attributes are separated from the name and each other
            raise Malformed(f"bad attribute at {j} in XMP")
        attr, k = m.group(), m.end()
        k = _SPACE.match(data, k).end()
        if not data.startswith(b"=", k):
            raise Malformed(f"attribute without a value at {j} in XMP")
        k = _SPACE.match(data, k + 1).end()
        quote = data[k : k + 1]
        if quote not in (b'"', b"'"):
            raise Malformed(f"unquoted attribute value at {k} in XMP")
        close = _find(data, quote, k + 1)
        if b"<" in data[k + 1 : close]:
            raise Malformed(f"'<' in an attribute value at {k} in XMP")
        if is_location_name(attr) and not attr.startswith(b"xmlns"):
            spans.append((j, close + 1))
        j = close + 1
