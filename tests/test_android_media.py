"""The Android-style media provider (policies/android-media.toml) on real mounts.

The backing tree belongs to the media service (uid 1023) and the daemon acts
as it (`--mounter 1023:1023`); apps are real processes running as the uids of
an app list written for the test, each with its own permission set. What the
policy promises is checked from the apps' side: private directories, media
kinds by extension, owners recorded on the backing files (and across a
restart), refusals, the reserved owner xattr, and location redaction of real
JPEG/MP4/MOV files through read(), mmap, sendfile and copy_file_range, also
when entitled and redacted readers share one file's page cache.

Oracles: the kernel (the same operation by the service uid natively on a twin
tree, stat of the backing file), exiftool as the independent reader, and the
data layer (credfs.filters / credfs.location on the backing file) for the
exact bytes a redacted read must return.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import fsops, media
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount

from credfs.filters import FILTERS
from credfs.location import location_ranges

MountFactory = Callable[..., CredfsMount]
AgentFactory = Callable[..., UserAgent]

POLICY = Path(__file__).resolve().parents[1] / "policies" / "android-media.toml"
MEDIA_RW = 1023
OWNER_XATTR = "trusted.credfs.owner"
SHARED = ("DCIM", "Pictures", "Movies", "Music", "Download", "Documents")
PRIVATE_KINDS = ("data", "obb", "media")

IMAGES, VIDEO, AUDIO = "READ_MEDIA_IMAGES", "READ_MEDIA_VIDEO", "READ_MEDIA_AUDIO"
LOCATION, MANAGE = "ACCESS_MEDIA_LOCATION", "MANAGE_EXTERNAL_STORAGE"

# Media kinds by extension, as the policy's [paths] lists say (any case).
KIND_EXT = {
    "image": {"jpg", "jpeg", "png", "gif", "webp", "heic", "heif", "dng"},
    "video": {"mp4", "mov", "m4v", "3gp", "mkv", "webm"},
    "audio": {"mp3", "m4a", "aac", "ogg", "opus", "flac", "wav"},
}
KIND_PERMISSION = {"image": IMAGES, "video": VIDEO, "audio": AUDIO}

needs_media_tools = pytest.mark.skipif(
    not (media.EXIFTOOL and media.FFMPEG),
    reason="needs exiftool and ffmpeg to write and read real media (scripts/setup.sh)")


@dataclass(frozen=True)
class App:
    name: str
    package: str
    uid: int
    permissions: frozenset[str]


def _app(name: str, uid: int, *perms: str) -> App:
    return App(name, f"com.test.{name}", uid, frozenset(perms))


APPS: dict[str, App] = {a.name: a for a in (
    _app("camera", 10001, IMAGES, VIDEO),  # owns the media: real bytes without LOCATION
    _app("gallery", 10002, IMAGES, VIDEO, LOCATION),  # entitled reader
    _app("viewer", 10003, IMAGES, VIDEO),  # redacted reader
    _app("photos", 10004, IMAGES),
    _app("videos", 10005, VIDEO),
    _app("music", 10006, AUDIO),
    _app("notes", 10007),
    _app("files", 10008, MANAGE),  # file manager: everything, location redacted
    _app("files_loc", 10009, MANAGE, LOCATION),
)}
ROOT = "root"  # "system" in the policy


def kind_of(rel: str) -> str | None:
    ext = rel.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    return next((k for k, exts in KIND_EXT.items() if "." in rel and ext in exts), None)


def sees_shared(viewer: str, owner_uid: int, rel: str) -> bool:
    """Whether viewer may see a file in the shared tree created by owner_uid."""
    if viewer == ROOT:
        return True
    app = APPS[viewer]
    if app.uid == owner_uid or MANAGE in app.permissions:
        return True
    kind = kind_of(rel)
    return kind is not None and KIND_PERMISSION[kind] in app.permissions


def redacted_for(viewer: str, owner_uid: int, rel: str) -> bool:
    """Whether viewer reads that (visible) file through the location filter."""
    if viewer == ROOT:
        return False
    app = APPS[viewer]
    if app.uid == owner_uid or LOCATION in app.permissions:
        return False
    return MANAGE in app.permissions or kind_of(rel) in ("image", "video")


def _stat_of(path: Path) -> dict[str, int]:
    """What fsops.stat returns, natively as root (the daemon acts as 1023 and
    reports the backing attributes)."""
    st = os.lstat(path)
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "nlink": st.st_nlink}


def _owner_record(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, OWNER_XATTR, follow_symlinks=False)
    except OSError:
        return None


def build_skeleton(root: Path) -> None:
    """The shared-storage tree as the media service keeps it: all 1023, 0755."""
    for rel in (*SHARED, "Android", *(f"Android/{k}" for k in PRIVATE_KINDS)):
        (root / rel).mkdir()
    for dirpath, dirnames, _ in os.walk(root):
        os.chown(dirpath, MEDIA_RW, MEDIA_RW)
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            os.chown(os.path.join(dirpath, d), MEDIA_RW, MEDIA_RW)


@dataclass
class Android:
    """One media-provider mount and an agent per app (and root)."""
    workdir: Path
    backing: Path
    mnt: Path
    policy: Path
    mount_credfs: MountFactory
    agents: dict[str, UserAgent]
    mount: CredfsMount | None = None
    extra: list[UserAgent] = field(default_factory=list)

    def start(self) -> CredfsMount:
        self.mount = self.mount_credfs("--mounter", f"{MEDIA_RW}:{MEDIA_RW}",
                                       "--policy", str(self.policy))
        return self.mount

    def restart(self) -> CredfsMount:
        assert self.mount is not None
        self.mount.stop()
        return self.start()

    def p(self, rel: str) -> str:
        return str(self.mnt / rel)

    def b(self, rel: str) -> Path:
        return self.backing / rel

    def do(self, who: str, fn: str, *args: Any) -> tuple[str, Any]:
        return self.agents[who].do(fn, *args)

    def call(self, who: str, fn: str, *args: Any) -> Any:
        return self.agents[who].call(fn, *args)

    def create(self, who: str, rel: str, data: bytes) -> None:
        """who creates rel through the mount (its creator is recorded)."""
        self.call(who, "write", self.p(rel), data, os.O_CREAT | os.O_EXCL)


def write_app_list(path: Path, apps: dict[str, App] = APPS) -> None:
    # Replaced atomically: a reload never reads half a list.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{a.package} {a.uid} {','.join(sorted(a.permissions))}\n"
                           for a in apps.values()))
    os.replace(tmp, path)


@pytest.fixture
def android(workdir: Path, backing: Path, mnt: Path, mount_credfs: MountFactory,
            make_agent: AgentFactory) -> Iterator[Android]:
    build_skeleton(backing)
    os.chown(backing, MEDIA_RW, MEDIA_RW)
    policy = workdir / "android-media.toml"
    shutil.copy(POLICY, policy)
    write_app_list(workdir / "android-apps.list")
    agents = {name: make_agent(a.uid, a.uid, [a.uid]) for name, a in APPS.items()}
    agents[ROOT] = make_agent(0, 0, [0])
    agents["media_rw"] = make_agent(MEDIA_RW, MEDIA_RW, [MEDIA_RW])  # for native twins
    a = Android(workdir, backing, mnt, policy, mount_credfs, agents)
    a.start()
    yield a


VIEWERS = (*APPS, ROOT)


# --- Android/data|obb|media/<pkg> -----------------------------------------------

PRIVATE_OWNERS = ("camera", "gallery", "notes", "files", "files_loc")


def test_private_app_directories(android: Android) -> None:
    """Android/{data,obb,media}/<pkg>: only <pkg> (and root) sees it; file
    managers also see Android/media; for everyone else it does not exist."""
    for owner in PRIVATE_OWNERS:
        pkg = APPS[owner].package
        for kind in PRIVATE_KINDS:
            android.call(owner, "mkdir", android.p(f"Android/{kind}/{pkg}"))
            android.create(owner, f"Android/{kind}/{pkg}/f.txt", f"{owner} {kind}".encode())

    problems = []
    for viewer in VIEWERS:
        for kind in PRIVATE_KINDS:
            expected_names = []
            for owner in PRIVATE_OWNERS:
                pkg = APPS[owner].package
                visible = viewer in (owner, ROOT) or (
                    kind == "media" and MANAGE in APPS[viewer].permissions)
                if visible:
                    expected_names.append(pkg)
                for rel in (f"Android/{kind}/{pkg}", f"Android/{kind}/{pkg}/f.txt"):
                    got = android.do(viewer, "stat", android.p(rel))
                    want = ("ok", _stat_of(android.b(rel))) if visible else ("err", 2)
                    if got != want:
                        problems.append((viewer, rel, "stat", got, want))
                rel = f"Android/{kind}/{pkg}/f.txt"
                got = android.do(viewer, "read", android.p(rel))
                want = ("ok", android.b(rel).read_bytes()) if visible else ("err", 2)
                if got != want:
                    problems.append((viewer, rel, "read", got, want))
            got = android.do(viewer, "getdents_names", android.p(f"Android/{kind}"))
            want = ("ok", sorted([".", "..", *expected_names]))
            if got != want:
                problems.append((viewer, f"Android/{kind}", "listing", got, want))
    assert problems == [], "\n".join(map(repr, problems))


def test_private_directories_of_others_cannot_be_entered_or_made(android: Android) -> None:
    """Writing into, creating or removing another app's private directory: the
    name does not exist (ENOENT) and nothing changes on the backing store."""
    cam = APPS["camera"].package
    android.call("camera", "mkdir", android.p(f"Android/data/{cam}"))
    android.create("camera", f"Android/data/{cam}/f.txt", b"camera")
    android.call("camera", "mkdir", android.p(f"Android/media/{cam}"))
    before = android.call(ROOT, "tree_state", str(android.backing))

    attempts: list[tuple[str, tuple[Any, ...]]] = [
        ("write", (android.p(f"Android/data/{cam}/f.txt"), b"x")),
        ("write", (android.p(f"Android/data/{cam}/new.txt"), b"x", os.O_CREAT)),
        ("unlink", (android.p(f"Android/data/{cam}/f.txt"),)),
        ("rmdir", (android.p(f"Android/data/{cam}"),)),
        ("mkdir", (android.p(f"Android/obb/{cam}"),)),  # not made yet: still not the caller's
        ("rename", (android.p(f"Android/data/{cam}/f.txt"), android.p("Download/stolen.txt"))),
    ]
    for viewer in ("gallery", "notes", "files"):
        for fn, args in attempts:
            assert android.do(viewer, fn, *args) == ("err", 2), (viewer, fn, args)
    assert android.call(ROOT, "tree_state", str(android.backing)) == before
    # A file manager writes Android/media/<pkg> of another app, as the service.
    android.create("files", f"Android/media/{cam}/by_files.txt", b"files")
    assert _stat_of(android.b(f"Android/media/{cam}/by_files.txt"))["uid"] == MEDIA_RW


# --- media kinds in the shared tree -------------------------------------------

# (creator, path): media of every kind, names of any case, non-media files,
# and directories; two creators so that "own files" differ per app.
SHARED_FILES = (
    ("notes", "DCIM/n.jpg"), ("notes", "DCIM/N2.JPEG"), ("notes", "Pictures/n.png"),
    ("notes", "Pictures/n.WebP"), ("notes", "Movies/n.mp4"), ("notes", "Movies/N.MOV"),
    ("notes", "Movies/n.mkv"), ("notes", "Music/n.mp3"), ("notes", "Music/n.FLAC"),
    ("notes", "Download/n.pdf"), ("notes", "Download/n.jpg.txt"), ("notes", "Documents/n.txt"),
    ("notes", "Download/noext"), ("notes", "DCIM/trip/t.jpg"), ("notes", "DCIM/trip/t.txt"),
    ("music", "Music/m.ogg"), ("music", "Documents/m.txt"), ("music", "Pictures/m.gif"),
    ("camera", "DCIM/trip/c.jpg"), ("camera", "Movies/c.3gp"), ("camera", "Download/c.zip"),
)
SHARED_DIRS_MADE = (("notes", "DCIM/trip"), ("camera", "Documents/camera_dir"))


def test_media_kinds_by_extension(android: Android) -> None:
    """Other apps' files are visible by kind and permission (read-only), own
    files always, directories to everyone; the rest does not exist."""
    for creator, rel in SHARED_DIRS_MADE:
        android.call(creator, "mkdir", android.p(rel))
    for creator, rel in SHARED_FILES:
        android.create(creator, rel, f"{creator}:{rel}".encode())
    dirs = sorted({*SHARED, *(r for _, r in SHARED_DIRS_MADE)})
    problems = []
    for viewer in VIEWERS:
        for rel_dir in dirs:
            want_names = sorted(
                [r.rsplit("/", 1)[1] for c, r in SHARED_FILES
                 if r.rsplit("/", 1)[0] == rel_dir and sees_shared(viewer, APPS[c].uid, r)]
                + [r.rsplit("/", 1)[1] for _, r in SHARED_DIRS_MADE
                   if r.rsplit("/", 1)[0] == rel_dir])
            got = android.do(viewer, "listdir", android.p(rel_dir))
            if got != ("ok", want_names):
                problems.append((viewer, rel_dir, "listdir", got, want_names))
            got = android.do(viewer, "stat", android.p(rel_dir))
            if got != ("ok", _stat_of(android.b(rel_dir))):
                problems.append((viewer, rel_dir, "stat", got))
        for creator, rel in SHARED_FILES:
            visible = sees_shared(viewer, APPS[creator].uid, rel)
            for fn, native in (("stat", _stat_of), ("read", Path.read_bytes)):
                got = android.do(viewer, fn, android.p(rel))
                want = ("ok", native(android.b(rel))) if visible else ("err", 2)
                if got != want:
                    problems.append((viewer, rel, fn, got, want))
    assert problems == [], "\n".join(map(repr, problems))


# --- changes to other apps' files ------------------------------------------------

OTHERS_FILES = ("DCIM/c.jpg", "Movies/c.mp4", "Music/c.mp3", "Documents/c.txt")


def _change_attempts(android: Android, viewer: str, rel: str, own: str
                     ) -> list[tuple[str, tuple[Any, ...]]]:
    p = android.p
    return [
        ("open_close", (p(rel), os.O_WRONLY)),
        ("open_close", (p(rel), os.O_RDWR)),
        ("open_close", (p(rel), os.O_RDONLY | os.O_TRUNC)),
        ("write", (p(rel), b"overwritten", os.O_APPEND)),
        ("truncate", (p(rel), 0)),
        ("unlink", (p(rel),)),
        ("rename", (p(rel), p(f"Download/{viewer}_took_it"))),
        ("rename", (p(own), p(rel))),  # replace it with one's own file
        ("rename2", (p(own), p(rel), fsops.RENAME_EXCHANGE)),
        # (the new name has the same kind: the policy decides a link on it)
        ("link", (p(rel), p(f"Download/{viewer}_link.{rel.rsplit('.', 1)[1]}"))),
        ("chmod", (p(rel), 0o600)),
        ("utime", (p(rel), (1, 1))),
        ("setxattr", (p(rel), "user.tag", b"mine")),
        ("removexattr", (p(rel), "user.keep")),
    ]


def test_changes_to_others_files_are_refused(android: Android) -> None:
    """Writes, truncates, renames (either side), deletes, links, chmod, times
    and xattrs on another app's file: EACCES where the file is visible to the
    app, ENOENT where it is hidden; the backing store does not change."""
    for rel in OTHERS_FILES:
        android.create("camera", rel, f"camera:{rel}".encode())
        android.call("camera", "setxattr", android.p(rel), "user.keep", b"1")
    android.call("camera", "mkdir", android.p("DCIM/album"))
    android.create("camera", "DCIM/album/a.jpg", b"album")
    problems = []
    for viewer in ("gallery", "viewer", "photos", "music", "notes"):
        own = f"Download/{viewer}.jpg"
        android.create(viewer, own, viewer.encode())
        before = android.call(ROOT, "tree_state", str(android.backing))
        for rel in OTHERS_FILES:
            want = ("err", 13) if sees_shared(viewer, APPS["camera"].uid, rel) else ("err", 2)
            for fn, args in _change_attempts(android, viewer, rel, own):
                got = android.do(viewer, fn, *args)
                if got != want:
                    problems.append((viewer, fn, args, got, want))
        # Another app's directory is visible to all, and cannot be changed.
        for fn, args in (("rmdir", (android.p("DCIM/album"),)),
                         ("rename", (android.p("DCIM/album"), android.p(f"DCIM/{viewer}"))),
                         ("chmod", (android.p("DCIM/album"), 0o700))):
            got = android.do(viewer, fn, *args)
            if got != ("err", 13):
                problems.append((viewer, fn, args, got))
        after = android.call(ROOT, "tree_state", str(android.backing))
        if after != before:
            problems.append((viewer, "backing changed",
                             {k for k in after.keys() | before.keys()
                              if after.get(k) != before.get(k)}))
        android.call(viewer, "unlink", android.p(own))
    assert problems == [], "\n".join(map(repr, problems))


def test_creating_over_a_hidden_name_does_not_reach_the_file(android: Android) -> None:
    """open(O_CREAT) without O_EXCL on a name hidden from the caller must not
    open the other app's file (neither to write it nor to read it), nor make
    the caller its owner: the hidden file is unchanged."""
    attempts: list[tuple[str, tuple[Any, ...]]] = [
        ("write", (b"mine", os.O_CREAT)),
        ("write", (b"mine", os.O_CREAT | os.O_TRUNC)),
        ("write", (b"mine", os.O_CREAT | os.O_APPEND)),
        ("open_fd", (os.O_RDWR | os.O_CREAT,)),  # then read what it opened
    ]
    for i in range(len(attempts)):
        android.create("camera", f"Documents/secret{i}.txt", b"camera's notes")
    before = android.call(ROOT, "tree_state", str(android.backing))
    problems = []
    for i, (fn, args) in enumerate(attempts):
        rel = f"Documents/secret{i}.txt"
        got = android.do("notes", fn, android.p(rel), *args)
        if got[0] == "ok" and fn == "open_fd":
            fd = got[1]
            got = ("ok", android.call("notes", "pread_fd", fd, 100, 0))
            android.call("notes", "close_fd", fd)
        if got[0] != "err":
            problems.append((fn, args, got))
        if _owner_record(android.b(rel)) != b"10001":
            problems.append((fn, args, "owner now", _owner_record(android.b(rel))))
    assert problems == [], "\n".join(map(repr, problems))
    assert android.call(ROOT, "tree_state", str(android.backing)) == before


def test_hard_links_to_others_files_are_refused(android: Android) -> None:
    """A hard link is a new name for another app's file: made in one's own
    Android/data|obb|media/<pkg> (where everything is the app's), it would
    give the app the file to write, and unredacted. Refused as any change to
    a file one sees but does not own; the backing file is unchanged."""
    android.create("camera", "DCIM/c.jpg", b"camera's photo")
    problems = []
    for viewer in ("gallery", "viewer"):
        pkg = APPS[viewer].package
        for kind in PRIVATE_KINDS:
            android.call(viewer, "mkdir", android.p(f"Android/{kind}/{pkg}"))
            got = android.do(viewer, "link", android.p("DCIM/c.jpg"),
                             android.p(f"Android/{kind}/{pkg}/c.jpg"))
            if got != ("err", 13):
                problems.append((viewer, kind, got))
    st = os.lstat(android.b("DCIM/c.jpg"))
    assert problems == [], "\n".join(map(repr, problems))
    assert (st.st_nlink, android.b("DCIM/c.jpg").read_bytes()) == (1, b"camera's photo")


def test_moving_a_directory_does_not_hand_over_others_files(android: Android) -> None:
    """An app may create files in another app's shared directory. When the
    directory's owner moves it into its own Android/data/<pkg> (where every
    name is the app's), the other app's files inside must not become its to
    read (unredacted) or write: the move is refused, or they stay out of its
    reach."""
    android.call("notes", "mkdir", android.p("DCIM/album"))
    pkg = APPS["notes"].package
    android.call("notes", "mkdir", android.p(f"Android/data/{pkg}"))
    android.create("camera", "DCIM/album/c.jpg", b"camera's photo")
    assert android.do("notes", "read", android.p("DCIM/album/c.jpg")) == ("err", 2)
    moved = android.do("notes", "rename", android.p("DCIM/album"),
                       android.p(f"Android/data/{pkg}/album"))
    where = f"Android/data/{pkg}/album/c.jpg" if moved[0] == "ok" else "DCIM/album/c.jpg"
    got = {fn: android.do("notes", fn, *args) for fn, args in (
        ("read", (android.p(where),)),
        ("write", (android.p(where), b"tampered", os.O_TRUNC)),
        ("unlink", (android.p(where),)))}
    assert all(v[0] == "err" for v in got.values()), (moved, got)
    assert android.b(where).read_bytes() == b"camera's photo"


def test_file_manager_changes_others_files(android: Android) -> None:
    """MANAGE_EXTERNAL_STORAGE sees and changes every shared file, as the
    service: the same outcomes and tree as uid 1023 doing it natively."""
    native = android.workdir / "native"
    native.mkdir()
    build_skeleton(native)
    os.chown(native, MEDIA_RW, MEDIA_RW)
    for rel in OTHERS_FILES:
        android.create("camera", rel, f"camera:{rel}".encode())
        (native / rel).write_bytes(f"camera:{rel}".encode())
        os.chown(native / rel, MEDIA_RW, MEDIA_RW)

    def ops(root: Path) -> list[tuple[str, tuple[Any, ...]]]:
        r = str(root)
        return [("write", (f"{r}/DCIM/c.jpg", b"edited", os.O_TRUNC)),
                ("rename", (f"{r}/Movies/c.mp4", f"{r}/Movies/renamed.mp4")),
                ("unlink", (f"{r}/Music/c.mp3",)),
                ("chmod", (f"{r}/Documents/c.txt", 0o600)),
                ("setxattr", (f"{r}/Documents/c.txt", "user.by", b"files"))]

    got = [android.do("files", fn, *a) for fn, a in ops(android.mnt)]
    want = [android.do("media_rw", fn, *a) for fn, a in ops(native)]
    assert got == want
    assert android.call(ROOT, "tree_state", str(android.mnt)) == \
        android.call(ROOT, "tree_state", str(native))


# --- the reserved owner xattr ------------------------------------------------------

def test_owner_xattr_is_invisible_and_unsettable_through_the_mount(android: Android) -> None:
    """trusted.credfs.* cannot be read, listed, set or removed through the
    mount, by apps or by root (who otherwise sees everything)."""
    android.create("camera", "DCIM/x.jpg", b"x")
    android.call("camera", "mkdir", android.p("DCIM/xd"))
    android.call("camera", "setxattr", android.p("DCIM/x.jpg"), "user.note", b"n")
    # Twins natively: one with the record (as credfs keeps it), one without.
    twin = android.workdir / "twin"
    twin.mkdir()
    for name in ("with", "without"):
        (twin / name).write_bytes(b"x")
        os.setxattr(twin / name, "user.note", b"n")
    os.setxattr(twin / "with", OWNER_XATTR, b"10001")
    for rel in ("DCIM/x.jpg", "DCIM/xd"):
        assert _owner_record(android.b(rel)) == str(APPS["camera"].uid).encode()

    problems = []
    for who in (ROOT, "camera", "gallery", "files_loc"):
        uid = android.agents[who].uid
        for rel in ("DCIM/x.jpg", "DCIM/xd"):
            p = android.p(rel)
            # Reading: as if the attribute were not there (root natively would
            # read it; an app natively never can read trusted.*).
            got = android.do(who, "getxattr", p, OWNER_XATTR)
            want = android.do(who, "getxattr", str(twin / "without"), OWNER_XATTR)
            if got != want:
                problems.append((who, rel, "getxattr", got, want))
            names = android.call(who, "listxattr", p)
            if any(n.startswith("trusted.credfs.") for n in names):
                problems.append((who, rel, "listxattr", names))
            for fn, args in (("setxattr", (p, OWNER_XATTR, str(uid).encode())),
                             ("setxattr", (p, OWNER_XATTR, b"10002", os.XATTR_REPLACE)),
                             ("setxattr", (p, "trusted.credfs.other", b"1")),
                             ("removexattr", (p, OWNER_XATTR))):
                got = android.do(who, fn, *args)
                if got[0] != "err":
                    problems.append((who, rel, fn, args, got))
    # Natively the list has user.note (and, for root, the record): through the
    # mount the same minus the reserved name.
    assert android.call(ROOT, "listxattr", android.p("DCIM/x.jpg")) == \
        [n for n in android.call(ROOT, "listxattr", str(twin / "with"))
         if not n.startswith("trusted.credfs.")]
    assert problems == [], "\n".join(map(repr, problems))
    for rel in ("DCIM/x.jpg", "DCIM/xd"):
        assert _owner_record(android.b(rel)) == str(APPS["camera"].uid).encode()
        assert sorted(os.listxattr(android.b(rel))) == sorted(
            [OWNER_XATTR] + (["user.note"] if rel.endswith(".jpg") else []))
    # The owner still owns them: it can delete its own file.
    assert android.do("camera", "unlink", android.p("DCIM/x.jpg")) == ("ok", None)


# --- owners across a restart ---------------------------------------------------------

def test_owners_survive_a_daemon_restart(android: Android) -> None:
    """The creator recorded on the backing file still decides after the daemon
    is replaced by a new one on the same backing directory."""
    created = ("DCIM/own.jpg", "Documents/own.txt", "DCIM/album/in.jpg")
    android.call("camera", "mkdir", android.p("DCIM/album"))
    for rel in created:
        android.create("camera", rel, f"camera:{rel}".encode())
    android.restart()
    for rel in (*created, "DCIM/album"):
        st = os.lstat(android.b(rel))
        assert (st.st_uid, st.st_gid) == (MEDIA_RW, MEDIA_RW), rel
        assert _owner_record(android.b(rel)) == b"10001", rel

    # Others: visible ones read-only (EACCES), hidden ones absent (ENOENT).
    for viewer in ("viewer", "notes"):
        for rel in created:
            want = ("err", 13) if sees_shared(viewer, 10001, rel) else ("err", 2)
            assert android.do(viewer, "write", android.p(rel), b"x") == want, (viewer, rel)
            assert android.do(viewer, "unlink", android.p(rel)) == want, (viewer, rel)
        assert android.do(viewer, "rmdir", android.p("DCIM/album")) == ("err", 13)
    assert android.do("viewer", "read", android.p("DCIM/own.jpg")) == \
        ("ok", b"camera:DCIM/own.jpg")

    # The owner: the same outcomes and tree as the service natively.
    native = android.workdir / "native"
    native.mkdir()
    build_skeleton(native)
    os.chown(native, MEDIA_RW, MEDIA_RW)
    (native / "DCIM/album").mkdir()
    os.chown(native / "DCIM/album", MEDIA_RW, MEDIA_RW)
    for rel in created:
        (native / rel).write_bytes(f"camera:{rel}".encode())
        os.chown(native / rel, MEDIA_RW, MEDIA_RW)

    def ops(root: Path) -> list[tuple[str, tuple[Any, ...]]]:
        r = str(root)
        return [("write", (f"{r}/DCIM/own.jpg", b"again", os.O_TRUNC)),
                ("pwrite", (f"{r}/Documents/own.txt", b"XY", 3)),
                ("rename", (f"{r}/Documents/own.txt", f"{r}/Documents/moved.txt")),
                ("unlink", (f"{r}/DCIM/album/in.jpg",)),
                ("rmdir", (f"{r}/DCIM/album",)),
                ("chmod", (f"{r}/DCIM/own.jpg", 0o640))]

    got = [android.do("camera", fn, *a) for fn, a in ops(android.mnt)]
    want = [android.do("media_rw", fn, *a) for fn, a in ops(native)]
    assert got == want
    assert android.call(ROOT, "tree_state", str(android.mnt)) == \
        android.call(ROOT, "tree_state", str(native))
    # A rename keeps the record (same inode); the new name is still camera's.
    assert _owner_record(android.b("Documents/moved.txt")) == b"10001"
    assert android.do("notes", "stat", android.p("Documents/moved.txt")) == ("err", 2)


# --- location redaction ---------------------------------------------------------------

# Real files with location from exiftool and ffmpeg (tests/helpers/media.py).
MEDIA_SAMPLES = {
    "exif_ii.jpg": "DCIM", "everything.jpg": "DCIM", "xmp.jpg": "Pictures",
    "ffmpeg.mp4": "Movies", "exiftool.mp4": "Movies", "ffmpeg.mov": "Movies",
    "ffmpeg_keys.mov": "Movies", "exiftool.mov": "DCIM",
}
# Another place, written in the same notation (so the sizes match).
LAT2, LON2 = "40.6892", "3.3945"


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if not (media.EXIFTOOL and media.FFMPEG):
        pytest.skip("needs exiftool and ffmpeg to write and read real media")
    d = tmp_path_factory.mktemp("android-media")
    out = {}
    for name in MEDIA_SAMPLES:
        p = d / name
        media.SAMPLES[name](p)
        out[name] = p.read_bytes()
    # A second version of everything.jpg: the same tags, another place.
    p = d / "moved.jpg"
    p.write_bytes(out["everything.jpg"])
    media.exiftool_write(p, f"-GPSLatitude={LAT2}", f"-GPSLongitude={LON2}",
                         f"-XMP-exif:GPSLatitude={LAT2}", f"-XMP-exif:GPSLongitude={LON2}")
    out["moved.jpg"] = p.read_bytes()
    return out


def redacted_bytes(path: Path) -> bytes:
    """The whole backing file as the redact-location filter serves it (data layer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        data = os.pread(fd, st.st_size, 0)
        view = FILTERS["redact-location"].view(fd, st)
    finally:
        os.close(fd)
    return view.apply(0, data) if view is not None else data


def ranges_of(path: Path) -> tuple[tuple[int, int], ...]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return location_ranges(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def differs_only_in(a: bytes, b: bytes, ranges: tuple[tuple[int, int], ...]) -> bool:
    if len(a) != len(b):
        return False
    pos = 0
    for s, e in ranges:
        if a[pos:s] != b[pos:s]:
            return False
        pos = e
    return a[pos:] == b[pos:]


def exiftool_as(agent: UserAgent, paths: list[str]) -> dict[str, dict]:
    """exiftool run by the agent itself on paths through the mount (its own
    reads: seeks, small and large reads), every tag of every file."""
    rc, out = agent.call("run_output", [
        media.EXIFTOOL, "-j", "-b", "-a", "-G1", "-n", "-ee", "-m", *paths], 300.0)
    assert rc in (0, 1), rc
    return {d["SourceFile"]: d for d in json.loads(out.decode("utf-8", "replace"))}


@pytest.fixture
def media_files(android: Android, samples: dict[str, bytes]) -> dict[str, str]:
    """camera's samples, written through the mount (so camera is their owner):
    sample name -> path relative to the mount."""
    out = {}
    for name, where in MEDIA_SAMPLES.items():
        rel = f"{where}/{name}"
        android.create("camera", rel, samples[name])
        out[name] = rel
    return out


@needs_media_tools
def test_redaction_of_real_media(android: Android, media_files: dict[str, str],
                                 samples: dict[str, bytes]) -> None:
    """Others without ACCESS_MEDIA_LOCATION read the file with every location
    byte overwritten and nothing else changed; exiftool finds no location in
    what they read. The owner and entitled apps read the real bytes, in which
    exiftool finds the location."""
    rels = list(media_files.values())
    originals = {rel: samples[name] for name, rel in media_files.items()}
    redacted = {rel: redacted_bytes(android.b(rel)) for rel in rels}
    for rel in rels:
        assert android.b(rel).read_bytes() == originals[rel]
        assert redacted[rel] != originals[rel], f"{rel}: nothing to redact?"
        assert differs_only_in(redacted[rel], originals[rel], ranges_of(android.b(rel)))
    truth = {rel: media.location_leaks(tags) for rel, tags in media.exiftool_read(
        [android.b(r) for r in rels]).items()}
    truth = {str(Path(k).relative_to(android.backing)): v for k, v in truth.items()}
    assert all(truth.values()), "every sample carries location"

    problems = []
    for viewer in ("camera", "gallery", "viewer", "photos", "videos", "files", "files_loc",
                   ROOT):
        visible = [r for r in rels if sees_shared(viewer, 10001, r)]
        hidden = [r for r in rels if r not in visible]
        for rel in hidden:
            if android.do(viewer, "read", android.p(rel)) != ("err", 2):
                problems.append((viewer, rel, "should be hidden"))
        if not visible:
            continue
        # Listed first (readdirplus makes the nodes), then read by name.
        for d in sorted({r.rsplit("/", 1)[0] for r in rels}):
            android.call(viewer, "listdir_stat", android.p(d))
        tags = exiftool_as(android.agents[viewer], [android.p(r) for r in visible])
        for rel in visible:
            redact = redacted_for(viewer, 10001, rel)
            want = redacted[rel] if redact else originals[rel]
            got = android.do(viewer, "read", android.p(rel))
            if got != ("ok", want):
                problems.append((viewer, rel, "bytes", "redacted" if redact else "real"))
            leaks = media.location_leaks(tags[android.p(rel)])
            if leaks != ({} if redact else truth[rel]):
                problems.append((viewer, rel, "exiftool", leaks))
    assert problems == [], "\n".join(map(repr, problems))


def _random_ranges(rng: random.Random, size: int, spans: tuple[tuple[int, int], ...],
                   n: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: anywhere, across span edges, past EOF, tiny and huge."""
    edges = [x for s, e in spans for x in (s, e)] or [0]
    out = []
    for i in range(n):
        if i % 3 == 0:
            off = max(0, rng.choice(edges) + rng.randint(-70, 70))
        else:
            off = rng.randint(0, size + 50)
        length = rng.choice((1, 2, 7, 511, 4096, 4097, 65536, rng.randint(0, size)))
        out.append((off, length))
    return out


@needs_media_tools
@pytest.mark.parametrize("name", ["everything.jpg", "exiftool.mov", "ffmpeg.mp4"])
def test_redacted_view_through_every_read_path(android: Android, media_files: dict[str, str],
                                               name: str) -> None:
    """Through the redacted view, pread at random offsets and lengths, mmap
    (MAP_SHARED and MAP_PRIVATE, read-only), sendfile and copy_file_range
    all give slices of the fully redacted bytes."""
    rel = media_files[name]
    red = redacted_bytes(android.b(rel))
    orig = android.b(rel).read_bytes()
    size = len(red)
    rng = random.Random(f"ranges-{name}")
    ranges = _random_ranges(rng, size, ranges_of(android.b(rel)), 120)
    want = [red[o:o + n] for o, n in ranges]
    p = android.p(rel)
    assert android.call("viewer", "pread_ranges", p, ranges) == want
    for shared in (True, False):
        in_file = [(o, min(n, size - o)) for o, n in ranges if o < size]
        assert android.call("viewer", "mmap_ranges", p, in_file, shared) == \
            [red[o:o + n] for o, n in in_file], f"mmap shared={shared}"
    for o, n in ranges[:30]:
        assert android.call("viewer", "sendfile_read", p, o, n) == red[o:o + n], ("sendfile", o, n)
    # copy_file_range into one's own file on the same mount (a memfd would be
    # another filesystem: EXDEV), then read back as its owner: no filter.
    for i, (o, n) in enumerate([(0, size), *ranges[:10]]):
        dst = android.p(f"Download/viewer_copy_{i}.bin")
        copied = android.call("viewer", "copy_range", p, dst, o, n)
        got = android.call("viewer", "read", dst)
        assert (copied, got) == (len(red[o:o + n]), red[o:o + n]), ("copy_file_range", o, n)
        assert android.b(f"Download/viewer_copy_{i}.bin").read_bytes() == red[o:o + n]
    # The entitled reader's mmap of the same file is the real thing.
    assert android.call("gallery", "mmap_ranges", p, [(0, size)], True) == [orig]


def _view_op(rng: random.Random, size: int) -> tuple[str, tuple[Any, ...], list[tuple[int, int]]]:
    """A random way to read a file: fsops function, its extra args, and the
    (offset, length) slices the result is made of."""
    kind = rng.choice(("read", "pread", "mmap_shared", "mmap_private"))
    if kind == "read":
        return "read", (), [(0, size)]
    ranges = [(rng.randint(0, size - 1), rng.choice((1, 100, 4096, 20000, size)))
              for _ in range(rng.randint(1, 4))]
    if kind == "pread":
        return "pread_ranges", (ranges,), ranges
    ranges = [(o, min(n, size - o)) for o, n in ranges]
    return "mmap_ranges", (ranges, kind == "mmap_shared"), ranges


def _result_bytes(fn: str, value: Any) -> bytes:
    return value if fn == "read" else b"|".join(value)


def _expect(fn: str, data: bytes, slices: list[tuple[int, int]]) -> bytes:
    if fn == "read":
        return data
    return b"|".join(data[o:o + n] for o, n in slices)


@needs_media_tools
def test_entitled_and_redacted_views_never_mix(android: Android, media_files: dict[str, str],
                                               samples: dict[str, bytes],
                                               make_agent: AgentFactory) -> None:
    """Apps that may and may not see location read one file, by read() and
    mmap, in many interleavings and concurrently, also while the owner
    rewrites it with another location between reads: each always gets
    exactly its own view of the version it reads."""
    rel = media_files["everything.jpg"]
    p = android.p(rel)
    # B: another place, same size; C: another photo, another size.
    versions = {"A": samples["everything.jpg"], "B": samples["moved.jpg"],
                "C": samples["exif_ii.jpg"]}
    assert len(versions["A"]) == len(versions["B"]) != len(versions["C"])
    # The redacted bytes of each version, from the data layer on a scratch copy.
    scratch = android.workdir / "scratch.jpg"
    red = {}
    for v, data in versions.items():
        scratch.write_bytes(data)
        red[v] = redacted_bytes(scratch)
    # Only location bytes differ between the versions: redacted, they are equal.
    assert red["A"] == red["B"]

    entitled = ("gallery", "camera", "files_loc")
    redacted_apps = ("viewer", "files", "photos")
    size = len(versions["A"])
    rotation = {"A": "B", "B": "C", "C": "A"}

    def expected(who: str, version: str) -> bytes:
        return versions[version] if who in entitled else red[version]

    # Sequential interleavings, with owner rewrites (new GPS) between reads.
    rng = random.Random(20240501)
    version = "A"
    held: dict[str, int] = {}
    problems = []
    for step in range(160):
        if step % 23 == 22:
            version = rotation[version]
            android.call("camera", "write", p, versions[version], os.O_TRUNC)
            continue
        who = rng.choice(entitled + redacted_apps)
        fn, args, slices = _view_op(rng, len(versions[version]))
        got = _result_bytes(fn, android.call(who, fn, p, *args))
        if got != _expect(fn, expected(who, version), slices):
            other = [w for w in versions if
                     got == _expect(fn, (versions if who not in entitled else red)[w], slices)]
            problems.append((step, who, fn, version, "other view" if other else "wrong bytes"))
        if step % 40 == 0:
            # A descriptor held across the rewrites: what it reads must still be
            # this app's view of one version, never the other view.
            for w in ("viewer", "gallery"):
                if w in held:
                    data = android.call(w, "pread_fd", held[w], size, 0)
                    if data not in [expected(w, v) for v in versions]:
                        problems.append((step, w, "held fd", version))
                    android.call(w, "close_fd", held[w])
                held[w] = android.call(w, "open_fd", p)
    for w, fd in held.items():
        android.call(w, "close_fd", fd)
    assert problems == [], "\n".join(map(repr, problems))

    # The redacted reads of the new version carry no location, by exiftool.
    android.call("camera", "write", p, versions["B"], os.O_TRUNC)
    tags = exiftool_as(android.agents["viewer"], [p])[p]
    assert media.location_leaks(tags) == {}
    assert media.location_leaks(exiftool_as(android.agents["gallery"], [p])[p])

    # Concurrently: two agents per app, each in its own thread.
    workers: list[tuple[str, UserAgent]] = []
    for who in ("gallery", "viewer", "camera", "files"):
        uid = APPS[who].uid
        workers += [(who, android.agents[who]), (who, make_agent(uid, uid, [uid]))]
    failures: list[Any] = []
    barrier = threading.Barrier(len(workers))

    def reader(i: int, who: str, agent: UserAgent) -> None:
        r = random.Random(f"thread-{i}")
        barrier.wait(timeout=30)
        for step in range(40):
            fn, args, slices = _view_op(r, size)
            try:
                got = _result_bytes(fn, agent.call(fn, p, *args))
            except Exception as exc:  # reported below, with the others
                failures.append((who, step, fn, repr(exc)))
                return
            if got != _expect(fn, expected(who, "B"), slices):
                failures.append((who, step, fn, "not its own view"))

    threads = [threading.Thread(target=reader, args=(i, w, a)) for i, (w, a) in
               enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


CHUNK = 16384


@needs_media_tools
def test_rewrites_under_concurrent_redacted_reads_never_show_location(
        android: Android, media_files: dict[str, str], samples: dict[str, bytes]) -> None:
    """While the owner rewrites a photo again and again (O_TRUNC, then the
    bytes piece by piece, so readers meet it half written), every read by a
    redacted reader is free of location by exiftool."""
    rel = media_files["everything.jpg"]
    p = android.p(rel)
    versions = [samples["everything.jpg"], samples["moved.jpg"]]
    scratch = android.workdir / "scratch.jpg"
    red = []
    for data in versions:
        scratch.write_bytes(data)
        red.append(redacted_bytes(scratch))
    stop = threading.Event()
    errors: list[str] = []

    def rewriter() -> None:
        # In 16 KiB pieces, each its own request: readers meet many prefixes.
        i = 0
        while not stop.is_set():
            i += 1
            data = versions[i % 2]
            try:
                android.call("camera", "write", p, data[:CHUNK], os.O_TRUNC)
                for off in range(CHUNK, len(data), CHUNK):
                    android.call("camera", "pwrite", p, data[off:off + CHUNK], off)
            except Exception as exc:
                errors.append(repr(exc))
                return

    seen: dict[bytes, int] = {}
    t = threading.Thread(target=rewriter)
    t.start()
    try:
        for _ in range(150):
            st, data = android.do("viewer", "read", p)
            if st == "ok":
                seen[data] = seen.get(data, 0) + 1
    finally:
        stop.set()
        t.join(timeout=60)
    assert not t.is_alive() and errors == []
    assert seen, "the reader never got a reply"
    out = android.workdir / "reads"
    out.mkdir()
    files = []
    for i, data in enumerate(seen):
        f = out / f"read{i}.jpg"
        f.write_bytes(data)
        files.append(f)
    tags = media.exiftool_read(files)
    leaking = {f.name: media.location_leaks(tags[str(f)]) for f in files
               if media.location_leaks(tags[str(f)])}
    assert leaking == {}
    # A read that met no rewrite is exactly the redacted bytes (both versions
    # redact to the same); one that met a rewrite may be short or fail closed.
    assert any(data in red for data in seen), "no read returned the redacted file"




def _reload(android: Android) -> None:
    """SIGHUP the daemon and wait (bounded) for it to log the reload."""
    m = android.mount
    assert m is not None and m.pid is not None
    needle = "policy reloaded from"
    before = m.log.count(needle)
    os.kill(m.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while m.log.count(needle) <= before:
        assert time.monotonic() < deadline, f"no reload logged; log:\n{m.log}"
        time.sleep(0.02)


@needs_media_tools
def test_permission_changes_on_reload_switch_views(android: Android,
                                                   media_files: dict[str, str]) -> None:
    """ACCESS_MEDIA_LOCATION granted or revoked in the app list (SIGHUP): the
    next open by the app reads through the view its permissions now give,
    although it read the file through the other view just before."""
    rel = media_files["everything.jpg"]
    p = android.p(rel)
    orig = android.b(rel).read_bytes()
    red = redacted_bytes(android.b(rel))
    assert android.call("gallery", "read", p) == orig
    assert android.call("viewer", "read", p) == red
    swapped = dict(APPS)
    swapped["gallery"] = _app("gallery", 10002, IMAGES, VIDEO)
    swapped["viewer"] = _app("viewer", 10003, IMAGES, VIDEO, LOCATION)
    write_app_list(android.workdir / "android-apps.list", swapped)
    _reload(android)
    for fn, args in (("read", ()), ("mmap_ranges", ([(0, len(orig))], True))):
        got = {w: android.call(w, fn, p, *args) for w in ("gallery", "viewer")}
        if fn != "read":
            got = {w: v[0] for w, v in got.items()}
        assert got == {"gallery": red, "viewer": orig}, fn
    write_app_list(android.workdir / "android-apps.list")
    _reload(android)
    assert android.call("gallery", "read", p) == orig
    assert android.call("viewer", "read", p) == red
