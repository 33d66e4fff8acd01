"""Identical test trees built as root, and a comparable snapshot of a tree.

A tree is built directly on a backing directory (never through a mount), so
that two copies of it can be compared after the same operations were done on
each in different ways (through credfs, natively, through overlayfs).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A security.capability value (v2, CAP_NET_BIND_SERVICE permitted, effective).
FILE_CAPS = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


@dataclass(frozen=True)
class Node:
    """One object of a tree: a directory ("d"), regular file ("f") or symlink ("l")."""

    path: str
    kind: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    data: bytes = b""  # file contents, or the symlink target
    acl: str | None = None  # `setfacl -m` spec
    default_acl: str | None = None  # `setfacl -d -m` spec
    xattrs: tuple[tuple[str, bytes], ...] = ()


def empty_dir(root: Path) -> None:
    """Remove everything inside root (as root), keeping root itself."""
    for child in os.listdir(root):
        p = root / child
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def build_tree(root: Path, tree: Iterable[Node], *, root_mode: int = 0o755,
               root_owner: tuple[int, int] = (0, 0)) -> None:
    """Empty root and build tree in it, in order (parents first)."""
    empty_dir(root)
    for name in os.listxattr(root):
        if name.startswith(("user.", "system.posix_acl_")):
            os.removexattr(root, name)
    os.chown(root, *root_owner)
    root.chmod(root_mode)
    for node in tree:
        p = root / node.path
        if node.kind == "d":
            p.mkdir()
        elif node.kind == "f":
            p.write_bytes(node.data)
        elif node.kind == "l":
            os.symlink(node.data, p)
            os.lchown(p, node.uid, node.gid)
            continue
        else:
            raise ValueError(f"unknown kind {node.kind!r}")
        os.chown(p, node.uid, node.gid)
        os.chmod(p, node.mode)  # after chown, which clears setuid/setgid
        for name, value in node.xattrs:
            os.setxattr(p, name, value)
        for flag, spec in (("-m", node.acl), ("-dm", node.default_acl)):
            if spec:
                subprocess.run(["setfacl", flag, spec, str(p)], check=True, timeout=30,
                               stdin=subprocess.DEVNULL, capture_output=True)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything an operation may change, for root and every object under it.

    Type, mode, owner, group, link count of non-directories, size and contents
    of files, symlink targets, user.* xattrs and POSIX ACLs. Times and inode
    numbers are left out; so are directory sizes and link counts (they follow
    from the tree itself) and other xattr namespaces (overlayfs keeps its own
    trusted.overlay.* ones on its upper layer).
    """
    out: dict[str, dict[str, Any]] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath, n) for n in sorted(dirnames + filenames)]
    for p in paths:
        st = os.lstat(p)
        entry: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode),
                                 "mode": oct(stat.S_IMODE(st.st_mode)),
                                 "uid": st.st_uid, "gid": st.st_gid}
        if stat.S_ISREG(st.st_mode):
            entry["nlink"] = st.st_nlink
            entry["size"] = st.st_size
            entry["data"] = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(p)
        if not stat.S_ISLNK(st.st_mode):
            entry["xattrs"] = {
                n: os.getxattr(p, n, follow_symlinks=False)
                for n in sorted(os.listxattr(p, follow_symlinks=False))
                if n.startswith(("user.", "system.posix_acl_"))}
        out[str(p.relative_to(root))] = entry
    return out


def diff_snapshots(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> str:
    """The entries that differ, one per line ("" when equal)."""
    return "\n".join(f"  {k}: {a.get(k)} != {b.get(k)}" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))
