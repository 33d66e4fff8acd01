"""The backing store: a journaled ext4 on a loop device whose image lives in a
tmpfs of our own, so the numbers measure the candidates and not a noisy disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import BenchError, sysutil

if TYPE_CHECKING:  # cleanup imports this module for the names below
    from .cleanup import Cleanup

# lazy_*_init=0: initialise inode tables and journal now, so the ext4lazyinit
# thread does not write in the background while we measure.
MKFS_OPTIONS = ["-q", "-F", "-t", "ext4", "-L", "credfs-bench",
                "-E", "lazy_itable_init=0,lazy_journal_init=0"]
MOUNT_OPTIONS = "rw,relatime"  # ext4 defaults: journal, data=ordered, barriers
SLACK = 64 << 20  # tmpfs beyond the image size: the image is all it holds
RAM_DIR = "ram"  # the tmpfs, in the run directory
# The image's name. Once its tmpfs is detached (umount -l) the kernel shows a
# loop device's backing file as "/<name>": the sweep still knows it as ours.
IMAGE = "credfs-compare.img"


@dataclass(frozen=True)
class RamDisk:
    tmpfs: str
    image: str
    loop: str
    mountpoint: str
    image_bytes: int

    @property
    def describe(self) -> str:
        return (f"ext4 ({' '.join(MKFS_OPTIONS)}; mount -o {MOUNT_OPTIONS}) on {self.loop}, "
                f"image of {self.image_bytes >> 20} MiB in a tmpfs")


def _umount_checked(path: str) -> None:
    if not sysutil.lazy_umount(path):
        raise BenchError(f"could not unmount {path}")


def make(run_dir: str, image_bytes: int, cleanup: Cleanup) -> RamDisk:
    """tmpfs -> image -> loop -> mkfs.ext4 -> mount; each step registered for undo."""
    avail = sysutil.meminfo().get("MemAvailable", 0)
    # The image, plus page cache for the files on it (ext4's and a FUSE
    # mount's copy), plus room for everything else on the machine.
    need = 2 * image_bytes + (1 << 30)
    if avail < need:
        raise BenchError(f"needs about {need >> 20} MiB of available memory for a "
                         f"{image_bytes >> 20} MiB RAM disk, {avail >> 20} MiB available "
                         f"(use --quick or free memory)")
    tmpfs = os.path.join(run_dir, RAM_DIR)
    mnt = os.path.join(run_dir, "ext4")
    os.mkdir(tmpfs, 0o700)
    os.mkdir(mnt, 0o755)
    sysutil.run(["mount", "-t", "tmpfs", "-o", f"size={image_bytes + SLACK},mode=0700",
                 "credfs-bench-ram", tmpfs])
    cleanup.push(f"unmount {tmpfs}", lambda: _umount_checked(tmpfs))
    image = os.path.join(tmpfs, IMAGE)
    # Allocate every page of the image now: otherwise whoever writes first to a
    # block of the fresh file system pays for tmpfs allocating its memory
    # (a first 1 GiB write measured at a quarter of the speed of later ones).
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, image_bytes)
    finally:
        os.close(fd)
    loop = sysutil.run(["losetup", "--find", "--show", image]).stdout.strip()
    if not loop.startswith("/dev/loop"):
        raise BenchError(f"losetup gave no loop device for {image}: {loop!r}")
    cleanup.push(f"detach {loop}", lambda: sysutil.detach_loop(loop))
    sysutil.run(["mkfs.ext4", *MKFS_OPTIONS, loop], timeout=300)
    sysutil.run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, loop, mnt])
    cleanup.push(f"unmount {mnt}", lambda: _umount_checked(mnt))
    os.chmod(mnt, 0o755)
    return RamDisk(tmpfs, image, loop, mnt, image_bytes)
