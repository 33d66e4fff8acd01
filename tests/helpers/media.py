"""Media files with location, written by independent tools, and exiftool as
the independent reader (for the location-redaction tests and benchmark)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

EXIFTOOL = shutil.which("exiftool")
FFMPEG = shutil.which("ffmpeg")

LAT, LON = "48.8584", "2.2945"
# Words planted in textual location fields; none appears in other metadata.
PLACE_WORDS = ("Paris", "Eiffel", "France", "Ile-de-France", "Champ")

# exiftool tag names (after the group) that carry location.
LOCATION_TAG = re.compile(
    r"^(GPS|Location|City|Country|State|Province|Sub-?location|WorldRegion)|Coordinates",
    re.IGNORECASE,
)


def run(cmd: list[str], timeout: float = 120) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr.strip()[:500]}")
    return p.stdout


def exiftool_write(path: Path, *args: str) -> None:
    run([EXIFTOOL, "-q", "-q", "-overwrite_original", *args, str(path)])


def exiftool_read(paths: Iterable[Path]) -> dict[str, dict]:
    """Every tag of each file, grouped (-G1), numeric (-n), embedded too (-ee)."""
    paths = [str(p) for p in paths]
    # exiftool exits 1 when some file has an error (a damaged one): it still reports.
    # -b: binary values as "base64:..." rather than "(Binary data N bytes ...)".
    out = run_bytes([EXIFTOOL, "-j", "-b", "-a", "-G1", "-n", "-ee", "-m", *paths], timeout=300,
                    ok=(0, 1))
    # A damaged file can hold any bytes in a string tag.
    return {d["SourceFile"]: d for d in json.loads(out.decode("utf-8", "replace"))}


def location_leaks(tags: dict) -> dict[str, object]:
    """The tags that still say something about a place: a non-zero digit or a
    planted place name in a tag whose name is about location."""
    leaks = {}
    for k, v in tags.items():
        name = k.split(":")[-1]
        if isinstance(v, str) and v.startswith("base64:"):
            v = base64.b64decode(v[7:]).decode("latin-1")
        s = re.sub(r"[\x00-\x1f]", "", str(v))  # a control byte is not a place
        if LOCATION_TAG.search(name) and (
            re.search(r"[1-9]", s) or any(w in s for w in PLACE_WORDS)
        ):
            leaks[k] = v
    return leaks


def pillow_jpeg(path: Path, size: tuple[int, int] = (64, 48), **save: object) -> None:
    from PIL import Image

    Image.new("RGB", size, (200, 120, 40)).save(path, "JPEG", quality=90, **save)


def pillow_noise_jpeg(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, quality=95)


def ffmpeg_clip(path: Path, *meta: str, seconds: float = 1, size: str = "64x48",
                extra: tuple[str, ...] = ()) -> None:
    run([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi",
         "-i", f"testsrc=size={size}:rate=10", "-f", "lavfi", "-i", "sine=frequency=440",
         "-t", str(seconds), "-c:v", "mpeg4", "-c:a", "aac", *extra, *meta, str(path)])


EXIF_GPS = (f"-GPSLatitude={LAT}", "-GPSLatitudeRef=N", f"-GPSLongitude={LON}",
            "-GPSLongitudeRef=E", "-GPSAltitude=35", "-GPSAltitudeRef=0",
            "-GPSDateStamp=2024:01:02", "-GPSTimeStamp=12:34:56", "-GPSMapDatum=WGS-84",
            "-GPSProcessingMethod=GPS", "-GPSAreaInformation=Paris Champ de Mars",
            "-Make=TestCam", "-Orientation#=6")
XMP_LOCATION = (f"-XMP-exif:GPSLatitude={LAT}", f"-XMP-exif:GPSLongitude={LON}",
                "-XMP-exif:GPSAltitude=35", "-XMP-exif:GPSAltitudeRef=0",
                "-XMP-photoshop:City=Paris", "-XMP-photoshop:State=Ile-de-France",
                "-XMP-photoshop:Country=France", "-XMP-iptcCore:Location=Eiffel",
                "-XMP-iptcExt:LocationCreatedCity=Paris",
                "-XMP-iptcExt:LocationShownCountryName=France",
                "-XMP-dc:Title=A title", "-XMP-dc:Creator=Someone")


def _jpeg_exif(byte_order: str) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        pillow_jpeg(p)
        exiftool_write(p, f"-ExifByteOrder={byte_order}", *EXIF_GPS)
    return make


def _jpeg_pillow_gps(p: Path) -> None:
    from PIL import ExifTags, Image

    exif = Image.Exif()
    exif[0x010F] = "PillowCam"
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (48.0, 51.0, 30.24), 3: "E", 4: (2.0, 17.0, 40.2),
                                  6: 35.0}
    pillow_jpeg(p, exif=exif)


def _jpeg_xmp(*extra: str) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        pillow_jpeg(p)
        exiftool_write(p, *extra, *XMP_LOCATION)
    return make


def _jpeg_thumbnail_gps(p: Path) -> None:
    """GPS in the main Exif and in the Exif of the thumbnail embedded in IFD1."""
    thumb = p.with_suffix(".thumb.jpg")
    pillow_jpeg(thumb, size=(16, 12))
    exiftool_write(thumb, *EXIF_GPS)
    pillow_jpeg(p, size=(160, 120))
    exiftool_write(p, *EXIF_GPS, f"-ThumbnailImage<={thumb}")
    thumb.unlink()


def _jpeg_everything(p: Path) -> None:
    """Exif GPS and XMP location, plus XMP large enough for extended XMP."""
    big = p.with_suffix(".txt")
    big.write_text("x" * 100_000)
    pillow_jpeg(p, size=(320, 240))
    exiftool_write(p, *EXIF_GPS, *XMP_LOCATION, f"-XMP-dc:Description<={big}")
    big.unlink()


def _mp4_ffmpeg(p: Path) -> None:  # ffmpeg writes 'loci' for mp4
    ffmpeg_clip(p, "-metadata", f"location=+{LAT}+00{LON}/", "-metadata", "title=Clip")


def _mov_ffmpeg(p: Path) -> None:  # and udta '©xyz' for mov
    ffmpeg_clip(p, "-metadata", f"location=+{LAT}+00{LON}/", "-metadata", "title=Clip")


def _mov_ffmpeg_keys(p: Path) -> None:  # mdta keys + ilst, as an iPhone writes them
    ffmpeg_clip(p, "-movflags", "use_metadata_tags",
                "-metadata", f"com.apple.quicktime.location.ISO6709=+{LAT}+00{LON}+035.000/",
                "-metadata", "com.apple.quicktime.location.name=Eiffel",
                "-metadata", "com.apple.quicktime.make=Apple", "-metadata", "title=Clip")


def _mp4_exiftool(p: Path) -> None:  # every QuickTime location exiftool writes, and XMP
    ffmpeg_clip(p, "-metadata", "title=Clip")
    exiftool_write(p, f"-Keys:GPSCoordinates={LAT}, {LON}, 35",
                   f"-UserData:GPSCoordinates={LAT}, {LON}",
                   f"-ItemList:GPSCoordinates={LAT}, {LON}",
                   f"-XMP-exif:GPSLatitude={LAT}", f"-XMP-exif:GPSLongitude={LON}",
                   "-XMP-photoshop:City=Paris")


def _mov_exiftool(p: Path) -> None:
    ffmpeg_clip(p, "-metadata", "title=Clip")
    exiftool_write(p, f"-Keys:GPSCoordinates={LAT}, {LON}, 35",
                   f"-UserData:GPSCoordinates={LAT}, {LON}",
                   f"-XMP-exif:GPSLatitude={LAT}", "-XMP-photoshop:City=Paris")


def _tiff_gps(p: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 24), (9, 9, 9)).save(p, "TIFF")
    exiftool_write(p, *EXIF_GPS[:-1])


def _tiff_xmp(p: Path) -> None:
    _tiff_gps(p)
    exiftool_write(p, *XMP_LOCATION)


SAMPLES: dict[str, Callable[[Path], None]] = {
    "exif_ii.jpg": _jpeg_exif("II"),
    "exif_mm.jpg": _jpeg_exif("MM"),
    "pillow_gps.jpg": _jpeg_pillow_gps,
    "xmp.jpg": _jpeg_xmp(),
    "xmp_shorthand.jpg": _jpeg_xmp("-api", "Compact=Shorthand"),
    "thumbnail_gps.jpg": _jpeg_thumbnail_gps,
    "everything.jpg": _jpeg_everything,
    "gps.tif": _tiff_gps,
    "xmp.tif": _tiff_xmp,
    "ffmpeg.mp4": _mp4_ffmpeg,
    "ffmpeg.mov": _mov_ffmpeg,
    "ffmpeg_keys.mov": _mov_ffmpeg_keys,
    "exiftool.mp4": _mp4_exiftool,
    "exiftool.mov": _mov_exiftool,
}


def make_samples(d: Path) -> dict[str, Path]:
    out = {}
    for name, make in SAMPLES.items():
        p = d / name
        make(p)
        out[name] = p
    return out


def run_bytes(cmd: list[str], timeout: float = 120, ok: tuple[int, ...] = (0,)) -> bytes:
    p = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if p.returncode not in ok:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr[:500]!r}")
    return p.stdout
