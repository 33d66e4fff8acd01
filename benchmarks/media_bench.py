"""Read throughput of media through the Android-style media provider policy.

Run on demand (as root; needs ffmpeg, exiftool and Pillow, see scripts/setup.sh):
    .venv/bin/python benchmarks/media_bench.py [--quick]

Mounts the backing tree with policies/android-media.toml as the media service
(uid 1023), has one app (the camera) put a large movie and a large photo with
GPS into DCIM through the mount, then reads each whole file, in the same run:
natively (the backing file), through credfs as the owner (no redaction) and as
another app without ACCESS_MEDIA_LOCATION (redacted), each from a cold cache
(caches dropped) and warm. Prints MB/s and ratios to native; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import media  # noqa: E402

SERVICE = 1023
CAMERA, GALLERY = 10001, 10002
APPS = (f"com.example.camera {CAMERA} READ_MEDIA_IMAGES,READ_MEDIA_VIDEO,ACCESS_MEDIA_LOCATION\n"
        f"com.example.gallery {GALLERY} READ_MEDIA_IMAGES,READ_MEDIA_VIDEO\n")
CHUNK = 1 << 20


def as_uid(uid: int, fn: object, *args: object) -> float:
    """Run fn(*args) -> float in a child process as uid; its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = fn(*args)  # type: ignore[operator]
            os.write(w, repr(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return float(out)


def read_whole(path: str) -> float:
    """Seconds to read path once, 1 MiB at a time."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - t


def copy_in(src: Path, dst: str) -> float:
    with open(src, "rb") as s, open(dst, "wb") as d:
        shutil.copyfileobj(s, d, CHUNK)
    return 0.0


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller files, 2 repetitions")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    reps = 2 if args.quick else args.reps
    work = Path(tempfile.mkdtemp(prefix="credfs-media-bench-"))
    work.chmod(0o755)
    src, mnt, samples = work / "src", work / "mnt", work / "samples"
    for d in ("DCIM", "Pictures", "Movies", "Music", "Download", "Documents",
              "Android/data", "Android/media", "Android/obb"):
        (src / d).mkdir(parents=True)
    mnt.mkdir()
    samples.mkdir()
    subprocess.run(["chown", "-R", f"{SERVICE}:{SERVICE}", str(src)], check=True)
    shutil.copy(ROOT / "policies" / "android-media.toml", work / "policy.toml")
    (work / "android-apps.list").write_text(APPS)
    # A large movie (uncompressed video) and a large photo, both with location.
    seconds = 4 if args.quick else 16
    movie, photo = samples / "movie.mov", samples / "photo.jpg"
    media.run([media.FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
               "testsrc=size=640x480:rate=10", "-t", str(seconds), "-c:v", "rawvideo",
               "-pix_fmt", "rgb24", "-metadata", f"location=+{media.LAT}+00{media.LON}/",
               str(movie)], timeout=600)
    media.pillow_noise_jpeg(photo, (2000, 1500) if args.quick else (4000, 3000))
    media.exiftool_write(photo, *media.EXIF_GPS, *media.XMP_LOCATION)
    for p in samples.iterdir():
        p.chmod(0o644)
    proc = subprocess.Popen([sys.executable, "-m", "credfs", "mount", str(src), str(mnt),
                             "--foreground", "--mounter", f"{SERVICE}:{SERVICE}",
                             "--policy", str(work / "policy.toml")],
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("credfs did not mount")
            time.sleep(0.05)
        print(f"{'file':<22}{'reader':<28}{'cold MB/s':>10}{'warm MB/s':>10}"
              f"{'cold/native':>13}{'warm/native':>13}")
        for sample in (movie, photo):
            through = str(mnt / "DCIM" / sample.name)
            as_uid(CAMERA, copy_in, sample, through)
            backing = str(src / "DCIM" / sample.name)
            size_mb = os.path.getsize(backing) / 1e6
            readers = [("native (backing file)", 0, backing),
                       ("credfs, owner app", CAMERA, through),
                       ("credfs, redacted app", GALLERY, through)]
            times: dict[str, tuple[list[float], list[float]]] = {r[0]: ([], []) for r in readers}
            for _ in range(reps):
                for label, uid, path in readers:  # interleaved: drift hits all alike
                    drop_caches()
                    times[label][0].append(as_uid(uid, read_whole, path))
                    times[label][1].append(as_uid(uid, read_whole, path))
            base = [statistics.median(t) for t in times[readers[0][0]]]
            for label, _uid, _path in readers:
                cold, warm = (statistics.median(t) for t in times[label])
                print(f"{sample.name + f' ({size_mb:.0f} MB)':<22}{label:<28}"
                      f"{size_mb / cold:>10.0f}{size_mb / warm:>10.0f}"
                      f"{base[0] / cold:>13.2f}{base[1] / warm:>13.2f}")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
