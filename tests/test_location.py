"""Location redaction, data layer (no mount): credfs.location finds the bytes
that carry location and credfs.filters serves views with them overwritten.

Files come from independent writers (Pillow, exiftool, ffmpeg); exiftool is
the independent reader that says whether location is still there.
"""

from __future__ import annotations

import os
import struct
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import media
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credfs.filters import FILTERS, OverwriteView, SpanFilter
from credfs.location import SPACE, ZERO, find_redactions, location_ranges

pytestmark = pytest.mark.skipif(
    not (media.EXIFTOOL and media.FFMPEG), reason="needs exiftool and ffmpeg (scripts/setup.sh)"
)


def _redactions(path: Path) -> tuple[tuple[int, int, int], ...]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return find_redactions(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _redacted_copy(path: Path, out: Path) -> bytes:
    """All of path read through the filter's view in one piece, written to out."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st_ = os.fstat(fd)
        data = os.pread(fd, st_.st_size, 0)
        view = FILTERS["redact-location"].view(fd, st_)
    finally:
        os.close(fd)
    red = view.apply(0, data) if view else data
    out.write_bytes(red)
    return red


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Samples, their fully redacted copies, and exiftool's reading of both."""
    d = tmp_path_factory.mktemp("media")
    red_dir = d / "redacted"
    red_dir.mkdir()
    samples = media.make_samples(d)
    redacted = {n: red_dir / n for n in samples}
    for n, p in samples.items():
        _redacted_copy(p, redacted[n])
    tags = media.exiftool_read([*samples.values(), *redacted.values()])
    return {
        n: {"orig": p, "red": redacted[n], "orig_tags": tags[str(p)],
            "red_tags": tags[str(redacted[n])]}
        for n, p in samples.items()
    }


SAMPLE_NAMES = list(media.SAMPLES)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_redacted_copy_has_no_location(corpus, name):
    c = corpus[name]
    assert media.location_leaks(c["orig_tags"]), "the sample should carry location"
    assert media.location_leaks(c["red_tags"]) == {}
    assert c["red"].stat().st_size == c["orig"].stat().st_size


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_only_the_ranges_change(corpus, name):
    c = corpus[name]
    orig, red = c["orig"].read_bytes(), c["red"].read_bytes()
    spans = _redactions(c["orig"])
    fd = os.open(c["orig"], os.O_RDONLY)
    try:
        assert location_ranges(fd, len(orig)) == tuple(
            _merge([(s, e) for s, e, _ in spans]))
    finally:
        os.close(fd)
    pos = 0
    for s, e, fill in spans:
        assert pos <= s < e <= len(orig) and fill in (ZERO, SPACE)
        assert red[pos:s] == orig[pos:s]
        assert red[s:e] == bytes((fill,)) * (e - s)
        pos = e
    assert red[pos:] == orig[pos:]
    # Everything else exiftool reports is unchanged (titles, make, orientation...),
    # but for an embedded thumbnail, whose own Exif is redacted (checked below).
    changed = {k for k, v in c["orig_tags"].items()
               if c["red_tags"].get(k) != v and not k.startswith(("System:", "Composite:"))
               and k not in ("SourceFile", "IFD1:ThumbnailImage")
               and not media.LOCATION_TAG.search(k.split(":")[-1])}
    assert changed == set()


def _merge(ranges):
    out = []
    for s, e in ranges:
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


@pytest.mark.parametrize("name", [n for n in SAMPLE_NAMES if n.endswith(".jpg")])
def test_redacted_jpeg_still_decodes_and_its_xmp_parses(corpus, name):
    from PIL import Image

    c = corpus[name]
    with Image.open(c["orig"]) as a, Image.open(c["red"]) as b:
        assert a.tobytes() == b.tobytes()
    xmp = media.run([media.EXIFTOOL, "-b", "-XMP", str(c["red"])]).strip()
    if xmp:  # blanked with spaces, the packet stays well-formed XML
        ET.fromstring(xmp[xmp.index("<x:xmpmeta"):xmp.rindex("</x:xmpmeta>") + 12])


@pytest.mark.parametrize("name", [n for n in SAMPLE_NAMES if n.endswith((".mp4", ".mov"))])
def test_redacted_video_still_decodes(corpus, name):
    c = corpus[name]
    media.run([media.FFMPEG, "-v", "error", "-nostdin", "-xerror", "-i", str(c["red"]),
               "-f", "null", "-"])


def test_thumbnail_exif_is_redacted(corpus, tmp_path):
    """exiftool does not read the thumbnail's own Exif; extract it and ask."""
    c = corpus["thumbnail_gps.jpg"]
    for which in ("orig", "red"):
        thumb = tmp_path / f"{which}.jpg"
        thumb.write_bytes(
            media.run_bytes([media.EXIFTOOL, "-b", "-ThumbnailImage", str(c[which])]))
        leaks = media.location_leaks(media.exiftool_read([thumb])[str(thumb)])
        assert bool(leaks) == (which == "orig"), (which, leaks)


# --- reads at any offset -------------------------------------------------------

@pytest.fixture(scope="module")
def views(corpus):
    out = {}
    for n, c in corpus.items():
        data = c["orig"].read_bytes()
        fd = os.open(c["orig"], os.O_RDONLY)
        try:
            view = FILTERS["redact-location"].view(fd, os.fstat(fd))
        finally:
            os.close(fd)
        assert view is not None
        out[n] = (data, c["red"].read_bytes(), view)
    return out


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SAMPLE_NAMES), data=st.data())
def test_any_read_equals_the_slice_of_the_redacted_file(views, name, data):
    orig, red, view = views[name]
    n = len(orig)
    offset = data.draw(st.integers(0, n + 100))
    length = data.draw(st.integers(0, n + 100 - offset))
    chunk = orig[offset : offset + length]  # what pread returns, short at EOF
    assert view.apply(offset, chunk) == red[offset : offset + length]


def test_reads_outside_every_range_return_the_same_object(views):
    orig, _, view = views["exif_ii.jpg"]
    s0 = view.spans[0][0]
    chunk = orig[:s0]
    assert view.apply(0, chunk) is chunk
    tail = orig[view.spans[-1][1]:]
    assert view.apply(view.spans[-1][1], tail) is tail
    assert view.apply(len(orig) + 10, b"") == b""


def test_ranges_straddling_read_boundaries():
    view = OverwriteView(((10, 20, ZERO), (20, 25, SPACE), (40, 41, ZERO)))
    data = bytes(range(1, 61))
    whole = view.apply(0, data)
    for size in (1, 3, 7, 16):
        pieced = b"".join(view.apply(o, data[o : o + size]) for o in range(0, 60, size))
        assert pieced == whole
    assert whole[9:26] == b"\x0a" + b"\0" * 10 + b" " * 5 + b"\x1a"
    assert whole[40] == 0 and whole[39] == 40 and whole[41] == 42


# --- the per-version cache ------------------------------------------------------

def test_cache_keeps_one_view_per_version_and_finds_again_on_change(tmp_path):
    flt = SpanFilter("t", find_redactions, max_entries=8)
    p = tmp_path / "f.jpg"
    media.pillow_jpeg(p)
    plain = p.read_bytes()
    fd = os.open(p, os.O_RDWR)
    try:
        assert flt.view(fd, os.fstat(fd)) is None  # no location yet
        media.exiftool_write(p, *media.EXIF_GPS)  # rewrites (a new inode) ...
        os.close(fd)
        fd = os.open(p, os.O_RDWR)
        v1 = flt.view(fd, os.fstat(fd))
        assert v1 is not None and flt.view(fd, os.fstat(fd)) is v1  # cached
        # ... in-place writes change size/mtime/ctime: the ranges are found again.
        with_gps = os.pread(fd, os.fstat(fd).st_size, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, plain, 0)
        assert flt.view(fd, os.fstat(fd)) is None
        os.pwrite(fd, with_gps, 0)
        v2 = flt.view(fd, os.fstat(fd))
        assert v2 is not None and v2 is not v1 and v2.spans == v1.spans
    finally:
        os.close(fd)


def test_cache_is_bounded_and_thread_safe(corpus):
    flt = SpanFilter("t", find_redactions, max_entries=3)
    fds = [os.open(c["orig"], os.O_RDONLY) for c in corpus.values()]
    results: list[list] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append([flt.view(fd, os.fstat(fd)).spans for fd in fds])
        except BaseException as e:  # reported below, not swallowed
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 8
        assert all(r == results[0] for r in results)
        assert flt.cached_versions() == 3
    finally:
        for fd in fds:
            os.close(fd)


def test_non_regular_and_empty_files_have_no_view(tmp_path):
    flt = FILTERS["redact-location"]
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert flt.view(fd, os.fstat(fd)) is None
    finally:
        os.close(fd)
    (tmp_path / "e").write_bytes(b"")
    fd = os.open(tmp_path / "e", os.O_RDONLY)
    try:
        assert flt.view(fd, os.fstat(fd)) is None
    finally:
        os.close(fd)


# --- hostile and damaged input ----------------------------------------------------

def _check_spans(spans, size):
    pos = 0
    for s, e, fill in spans:
        assert pos <= s < e <= size and fill in (ZERO, SPACE)
        pos = e


def _redact_bytes(path: Path) -> bytes:
    spans = _redactions(path)
    data = bytearray(path.read_bytes())
    _check_spans(spans, len(data))
    for s, e, fill in spans:
        data[s:e] = bytes((fill,)) * (e - s)
    return bytes(data)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_damaged_files_leak_nothing_exiftool_finds(corpus, tmp_path, seed):
    """Random byte damage in the metadata (the first 3 KB of a JPEG or TIFF, the
    moov at the end of a movie): whatever exiftool still reads from the damaged
    file, it reads no location from the redacted one. This is what fail-closed
    buys: damage that stops our parser early must not hand exiftool the GPS."""
    import random

    rng = random.Random(seed)
    pairs = []
    for name, c in corpus.items():
        data = c["orig"].read_bytes()
        movie = name.endswith((".mp4", ".mov"))
        window = min(len(data), 4000 if movie else 3000)
        for k in range(30):
            d = bytearray(data)
            for _ in range(rng.choice((1, 1, 2, 4))):
                i = rng.randrange(window)
                i = len(d) - 1 - i if movie else i
                d[i] = rng.choice((0, 0xFF, rng.randrange(256), d[i] ^ (1 << rng.randrange(8))))
            p, r = tmp_path / f"{k}_{name}", tmp_path / f"r{k}_{name}"
            p.write_bytes(d)
            r.write_bytes(_redact_bytes(p))
            pairs.append(r)
    tags = media.exiftool_read(pairs)
    leaks = {p.name: media.location_leaks(tags[str(p)]) for p in pairs}
    assert {k: v for k, v in leaks.items() if v} == {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["everything.jpg", "thumbnail_gps.jpg", "exiftool.mp4",
                                  "ffmpeg_keys.mov", "gps.tif"])
def test_truncated_files_leak_nothing(corpus, tmp_path, name):
    data = corpus[name]["orig"].read_bytes()
    cuts = sorted({*range(0, min(len(data), 4000), 97), *range(0, len(data), len(data) // 40),
                   *range(max(0, len(data) - 4000), len(data), 89)})
    outs = []
    for cut in cuts:
        p, r = tmp_path / f"{cut}_{name}", tmp_path / f"r{cut}_{name}"
        p.write_bytes(data[:cut])
        r.write_bytes(_redact_bytes(p))
        outs.append(r)
    tags = media.exiftool_read(outs)
    leaks = {p.name: media.location_leaks(tags[str(p)]) for p in outs}
    assert {k: v for k, v in leaks.items() if v} == {}


def _tiff_ifd(entries, next_ifd=0, bo="<"):
    out = struct.pack(bo + "H", len(entries))
    for tag, typ, count, value in entries:
        out += struct.pack(bo + "HHII", tag, typ, count, value)
    return out + struct.pack(bo + "I", next_ifd)


def _jpeg_with_exif(tiff: bytes) -> bytes:
    app1 = b"Exif\0\0" + tiff
    return (b"\xff\xd8" + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
            + b"\xff\xda\x00\x08" + b"\0" * 6 + b"scan data" + b"\xff\xd9")


def _spans_of(tmp_path: Path, data: bytes, name="f"):
    p = tmp_path / name
    p.write_bytes(data)
    return _redactions(p), p


@pytest.mark.timeout(60)
def test_looping_ifds_end_and_the_gps_is_zeroed(tmp_path):
    # IFD0 at 8 links to itself as next IFD, as Exif IFD and as GPS IFD;
    # the GPS IFD's next pointer leads back to IFD0.
    ifd0 = _tiff_ifd([(0x8769, 4, 1, 8), (0x8825, 4, 1, 8 + 30)], next_ifd=8)
    gps = _tiff_ifd([(2, 5, 3, 8 + 30 + 18), (4, 5, 3, 8 + 30 + 18)], next_ifd=8)
    tiff = b"II*\0" + struct.pack("<I", 8) + ifd0 + gps + struct.pack("<6I", 48, 1, 51, 1, 30, 1)
    spans, _ = _spans_of(tmp_path, _jpeg_with_exif(tiff))
    base = 12
    zeroed = {(s - base, e - base) for s, e, _ in spans}
    # The GPS IFD and its value are zeroed; IFD0, reached again as "GPS" through the
    # loop, is zeroed as well (an attacker's file loses what it linked).
    assert (8, 8 + 30 + 18 + 24) in zeroed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("entries", [
    [(0x8825, 4, 1, 0xFFFFFFF0)],  # GPS IFD far outside the block
    [(0x014A, 4, 0x7FFFFFFF, 8)],  # two billion SubIFDs
    [(0x8825, 4, 1, 26)],          # a GPS IFD whose count runs past the block (below)
])
def test_absurd_offsets_and_counts_zero_the_exif_block(tmp_path, entries):
    ifd0 = _tiff_ifd(entries)
    tiff = b"MM\0*" + struct.pack(">I", 8) + _tiff_ifd(entries, bo=">")[:len(ifd0)]
    tiff += b"\xff\xff" + b"\0" * 10  # at 26: an IFD claiming 65535 entries
    data = _jpeg_with_exif(tiff)
    spans, _ = _spans_of(tmp_path, data)
    assert (12, 12 + len(tiff), ZERO) in spans  # the whole TIFF block, fail closed
    assert data.endswith(b"scan data\xff\xd9")  # and nothing outside it


def _box(typ: bytes, payload: bytes, large=False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, typ, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), typ) + payload


XYZ = b"\0\x13\x15\xc7+48.8584+002.2945/"


def test_large_and_to_end_box_sizes(tmp_path):
    udta = _box(b"udta", _box(b"\xa9xyz", XYZ) + b"\0\0\0\0")  # QuickTime terminator
    moov = _box(b"moov", udta, large=True)
    tail = struct.pack(">I4s", 0, b"mdat") + b"media" * 100  # size 0: to end of file
    data = _box(b"ftyp", b"qt  \0\0\0\0qt  ") + moov + tail
    spans, _ = _spans_of(tmp_path, data)
    at = data.index(XYZ)
    assert spans == ((at, at + len(XYZ), ZERO),)


@pytest.mark.timeout(60)
def test_deep_nesting_is_bounded_and_fails_closed(tmp_path):
    inner = _box(b"\xa9xyz", XYZ)
    for _ in range(5000):
        inner = _box(b"udta", inner)
    data = _box(b"ftyp", b"isom\0\0\0\0isom") + _box(b"moov", inner)
    spans, _ = _spans_of(tmp_path, data)
    at = data.index(XYZ)
    assert any(s <= at and at + len(XYZ) <= e for s, e, _ in spans)


@pytest.mark.timeout(60)
def test_a_million_boxes_exhaust_the_budget_and_fail_closed(tmp_path):
    many = _box(b"free", b"") * 300_000
    data = (_box(b"ftyp", b"isom\0\0\0\0isom") + _box(b"moov", many + _box(b"udta",
            _box(b"\xa9xyz", XYZ))))
    spans, _ = _spans_of(tmp_path, data)
    at = data.index(XYZ)
    assert any(s <= at and at + len(XYZ) <= e for s, e, _ in spans)


def test_box_past_its_parent_zeroes_the_container(tmp_path):
    bad = struct.pack(">I4s", 4000, b"\xa9xyz") + XYZ
    udta = _box(b"udta", _box(b"\xa9nam", b"\0\3\0\0abc") + bad)
    data = _box(b"ftyp", b"isom\0\0\0\0isom") + _box(b"moov", udta)
    spans, _ = _spans_of(tmp_path, data)
    start = data.index(b"udta") + 4
    assert spans == ((start, len(data), ZERO),)


@pytest.mark.parametrize("packet", [
    b"<x:xmpmeta><rdf:RDF><rdf:Description><exif:GPSLatitude>48,51N</exif:GPSLatitude>",
    b"<x:xmpmeta><!DOCTYPE x [<!ENTITY e 'GPS'>]><exif:GPSLatitude>1</exif:GPSLatitude>"
    b"</x:xmpmeta>",
    b"<?xpacket begin='' <x:xmpmeta><exif:GPSLatitude>48,51N</exif:GPSLatitude></x:xmpmeta>"
    b"<?xpacket end='w'?>",
    b"<x:xmpmeta>\0<exif:GPSLatitude>48</exif:GPSLatitude></x:xmpmeta>",
])
def test_xmp_this_scanner_cannot_follow_is_zeroed_whole(tmp_path, packet):
    seg = b"http://ns.adobe.com/xap/1.0/\0" + packet
    data = (b"\xff\xd8\xff\xe1" + struct.pack(">H", len(seg) + 2) + seg
            + b"\xff\xda\x00\x02" + b"scan\xff\xd9")
    spans, _ = _spans_of(tmp_path, data)
    start = 6 + 29
    assert spans == ((start, start + len(packet), ZERO),)


def test_unrecognised_files_are_left_alone(tmp_path):
    for i, data in enumerate([b"", b"plain text\n" * 1000, os.urandom(5000).replace(b"II*", b"")
                              .replace(b"MM\0", b"").replace(b"\xff\xd8", b"")]):
        spans, _ = _spans_of(tmp_path, data, f"u{i}")
        assert spans == ()


def test_keys_are_read_to_the_box_end_whatever_the_count(tmp_path):
    key = b"com.apple.quicktime.location.ISO6709"
    keys = _box(b"keys", struct.pack(">II", 0, 0)  # count 0, yet one entry follows
                + struct.pack(">I4s", 8 + len(key), b"mdta") + key)
    value = b"+48.8584+002.2945/"
    item = _box(struct.pack(">I", 1), _box(b"data", struct.pack(">II", 1, 0) + value))
    meta = _box(b"meta", _box(b"hdlr", b"\0" * 8 + b"mdta" + b"\0" * 13) + keys
                + _box(b"ilst", item))
    data = _box(b"ftyp", b"qt  \0\0\0\0qt  ") + _box(b"moov", meta)
    spans, _ = _spans_of(tmp_path, data)
    at = data.index(value)
    assert spans == ((at, at + len(value), ZERO),)


@pytest.mark.parametrize("typ, fmt", [(1, "B"), (6, "b"), (3, "H"), (2, None), (5, None)])
def test_gps_pointer_of_any_integer_type_is_followed(tmp_path, typ, fmt):
    """exiftool follows GPSInfo whatever its declared type: so do we, and a
    type we cannot read as an offset zeroes the block."""
    gps_at = 8 + 18
    value = struct.pack("<B", gps_at) + b"\0\0\0" if fmt in ("B", "b") else \
        struct.pack("<H", gps_at) + b"\0\0"
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHI", 0x8825, typ, 1) + value + b"\0" * 4
    gps = _tiff_ifd([(1, 2, 2, ord("N"))])
    tiff = b"II*\0" + struct.pack("<I", 8) + ifd0 + gps
    spans, _ = _spans_of(tmp_path, _jpeg_with_exif(tiff))
    if fmt:
        assert spans == ((12 + gps_at, 12 + gps_at + len(gps), ZERO),)
    else:
        assert spans == ((12, 12 + len(tiff), ZERO),)
