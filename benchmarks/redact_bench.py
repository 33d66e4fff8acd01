"""Location redaction, in process: the cost of finding the ranges of a file
version and of applying them to reads, against plain os.pread in the same run.

Run on demand (needs exiftool, ffmpeg and Pillow, see scripts/setup.sh):
    .venv/bin/python benchmarks/redact_bench.py [--quick]
Prints plain numbers; nothing is asserted. Files are read from the page cache
(each is read once before timing), so "native" is memory bandwidth: the
numbers show what redaction adds on top of the cheapest read there is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import media  # noqa: E402

from credfs.filters import SpanFilter  # noqa: E402
from credfs.location import find_redactions  # noqa: E402

CHUNK = 128 << 10  # what a FUSE read asks for (max_read)


def make_files(d: Path, quick: bool) -> list[tuple[str, Path]]:
    out = []
    for side in (640, 2000) if quick else (640, 2000, 4000):
        p = d / f"noise_{side}.jpg"
        media.pillow_noise_jpeg(p, (side, side * 3 // 4))
        media.exiftool_write(p, *media.EXIF_GPS, *media.XMP_LOCATION)
        out.append((f"JPEG {side}px, Exif+XMP GPS", p))
    p = d / "clip.mp4"
    media.ffmpeg_clip(p, "-metadata", f"location=+{media.LAT}+00{media.LON}/", seconds=2)
    out.append(("MP4 2 s, loci", p))
    # A large movie fast: uncompressed video in a QuickTime file.
    seconds = 4 if quick else 12
    p = d / "raw.mov"
    media.run([media.FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi",
               "-i", "testsrc=size=640x480:rate=10", "-t", str(seconds), "-c:v", "rawvideo",
               "-pix_fmt", "rgb24", "-metadata", f"location=+{media.LAT}+00{media.LON}/", str(p)],
              timeout=600)
    out.append((f"MOV {seconds} s raw, ©xyz", p))
    return out


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_all(fd: int, size: int, view=None) -> int:
    total = 0
    for off in range(0, size, CHUNK):
        b = os.pread(fd, CHUNK, off)
        if view is not None:
            b = view.apply(off, b)
        total += len(b)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller files, fewer repetitions")
    args = ap.parse_args()
    if not (media.EXIFTOOL and media.FFMPEG):
        sys.exit("redact_bench: needs exiftool and ffmpeg (scripts/setup.sh)")
    reps = 3 if args.quick else 7
    with tempfile.TemporaryDirectory(prefix="credfs-redact-bench-") as tmp:
        files = make_files(Path(tmp), args.quick)
        plain = Path(tmp) / "plain.bin"
        plain.write_bytes(os.urandom(files[-1][1].stat().st_size))
        print(f"read size {CHUNK >> 10} KiB; best of {reps}; MB = 10^6 bytes\n")
        print(f"{'file':34} {'size MB':>8} {'ranges':>6} {'find ms':>8} "
              f"{'native MB/s':>12} {'redacted MB/s':>14} {'time x':>6} "
              f"{'hit-read MB/s':>14} {'view() µs':>10}")
        for label, p in [*files, ("random bytes (no location)", plain)]:
            fd = os.open(p, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                size = st.st_size
                read_all(fd, size)  # warm the page cache
                spans = find_redactions(fd, size)
                find_s = best_of(reps, lambda: find_redactions(fd, size))  # noqa: B023
                flt = SpanFilter("bench", find_redactions)
                view = flt.view(fd, st)
                hit_s = best_of(reps, lambda: [flt.view(fd, st) for _ in range(1000)])  # noqa: B023
                native = best_of(reps, lambda: read_all(fd, size))  # noqa: B023
                redacted = best_of(reps, lambda: read_all(fd, size, view))  # noqa: B023
                # Reads that do overlap a range: only the chunks holding one.
                hits = sorted({s // CHUNK * CHUNK for s, _, _ in spans})
                chunks = [(o, os.pread(fd, CHUNK, o)) for o in hits]
                if view is not None and chunks:
                    hit = best_of(reps, lambda: [view.apply(o, b) for o, b in chunks])  # noqa: B023
                    hit_mb = sum(len(b) for _, b in chunks) / hit / 1e6
                    hit_txt = f"{hit_mb:14.0f}"
                else:
                    hit_txt = f"{'-':>14}"
                print(f"{label:34} {size / 1e6:8.1f} {len(spans):6d} {find_s * 1e3:8.2f} "
                      f"{size / native / 1e6:12.0f} {size / redacted / 1e6:14.0f} "
                      f"{redacted / native:6.2f} {hit_txt} {hit_s / 1000 * 1e6:10.2f}")
            finally:
                os.close(fd)
        print("\nfind ms: location_ranges for one file version (no cache); redacted: pread +"
              " view.apply over the whole file;\ntime x: redacted time / native time;"
              " hit-read: apply() on the chunks that overlap a range;\nview(): a cache hit"
              " for a known version.")


if __name__ == "__main__":
    main()
