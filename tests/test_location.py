"""Location redaction, data layer (no mount): credfs.location finds the bytes
that carry location and credfs.filters serves views with them overwritten.

Files come from independent writers (Pillow, exiftool, ffmpeg); exiftool is
the independent reader that says whether location is still there.
"""

from __future__ import annotations

import os
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
    # Everything else exiftool reports is unchanged (titles, make, orientation...).
    changed = {k for k, v in c["orig_tags"].items()
               if c["red_tags"].get(k) != v and not k.startswith(("System:", "Composite:"))
               and k != "SourceFile" and not media.LOCATION_TAG.search(k.split(":")[-1])}
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
    fd = os.open(p, os.O_RDWR)
    try:
        assert flt.view(fd, os.fstat(fd)) is None  # no location yet
        media.exiftool_write(p, *media.EXIF_GPS)  # rewrites (a new inode) ...
        os.close(fd)
        fd = os.open(p, os.O_RDWR)
        v1 = flt.view(fd, os.fstat(fd))
        assert v1 is not None and flt.view(fd, os.fstat(fd)) is v1  # cached
        # ... an in-place write changes mtime/ctime: the ranges are found again.
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        os.pwrite(fd, b"\xff\xd8" + b"\0" * 10, 0)  # no longer a JPEG
        assert flt.view(fd, os.fstat(fd)) is None
        os.pwrite(fd, data[:12], 0)
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
