"""Shared fixtures: test identities, agents running as them, scratch dirs, mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers.agents import USERS, Identity, UserAgent
from helpers.helperfs import HelperFs, start_helper_fs
from helpers.mounts import CredfsMount, lazy_umount, mounts


def _suite_unusable() -> str | None:
    if os.geteuid() != 0:
        return "credfs tests need root: they switch to other uids and mount FUSE filesystems"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"credfs tests need a usable /dev/fuse ({e.strerror})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _suite_unusable()
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def users() -> dict[str, Identity]:
    """alice, bob, carol (numeric ids, no passwd entries) and root."""
    return dict(USERS)


def _force_rmtree(path: Path) -> None:
    # Unmount leftovers first (deepest first) so the walk never enters a FUSE
    # mount; then make every directory writable and searchable for the removal.
    for m in sorted((m for m in mounts() if m.mountpoint.startswith(f"{path}/")),
                    key=lambda m: m.mountpoint.count("/"), reverse=True):
        lazy_umount(m.mountpoint)
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            with contextlib.suppress(OSError):
                if not os.path.islink(p):
                    os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IRWXU)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh 0755 directory under $CREDFS_TEST_TMPDIR (set by .ci/run) or /tmp.

    Not tmp_path: its ancestors are 0700 and the test uids could not reach it.
    """
    base = os.environ.get("CREDFS_TEST_TMPDIR") or "/tmp"
    path = Path(tempfile.mkdtemp(prefix="credfs-test-", dir=base))
    path.chmod(0o755)
    try:
        yield path
    finally:
        _force_rmtree(path)


@pytest.fixture
def backing(workdir: Path) -> Path:
    """The backing directory: root-owned, 0755; tests chmod/chown as they need."""
    p = workdir / "src"
    p.mkdir()
    p.chmod(0o755)
    return p


@pytest.fixture
def mnt(workdir: Path) -> Path:
    """An empty root-owned 0755 mountpoint."""
    p = workdir / "mnt"
    p.mkdir()
    p.chmod(0o755)
    return p


@pytest.fixture
def native(workdir: Path) -> Path:
    """The native twin of `backing` (workdir/native, root 0755): the same tree is
    built in both and the kernel's answers on it are the oracle; never mounted over."""
    p = workdir / "native"
    p.mkdir()
    p.chmod(0o755)
    return p


MountFactory = Callable[..., CredfsMount]


@pytest.fixture
def mount_credfs(workdir: Path, backing: Path, mnt: Path) -> Iterator[MountFactory]:
    """mount_credfs(*args, source=backing, mountpoint=mnt, kind=CredfsMount, caller_caps=True)
    -> started mount (caller_caps: see CredfsMount).

    Every mount started through it is stopped (and unmounted) at teardown.
    """
    started: list[CredfsMount] = []

    def factory(*args: str, source: str | os.PathLike[str] | None = None,
                mountpoint: str | os.PathLike[str] | None = None,
                kind: type[CredfsMount] = CredfsMount, caller_caps: bool = True) -> CredfsMount:
        m = kind(source or backing, mountpoint or mnt, *args, caller_caps=caller_caps,
                 log_path=workdir / f"credfs-{len(started)}.log")
        started.append(m)
        return m.start()

    try:
        yield factory
    finally:
        for m in reversed(started):
            m.stop()


AgentFactory = Callable[..., UserAgent]


@pytest.fixture
def make_agent() -> Iterator[AgentFactory]:
    """make_agent(identity, umask=0o022) or make_agent(uid, gid, groups, umask=0o022).

    Every agent made through it is closed at teardown.
    """
    made: list[UserAgent] = []

    def factory(who: Identity | int, gid: int | None = None,
                groups: Sequence[int] | None = None, umask: int = 0o022) -> UserAgent:
        if isinstance(who, Identity):
            a = UserAgent.for_identity(who, umask)
        else:
            if gid is None or groups is None:
                raise TypeError("make_agent(uid, gid, groups) needs gid and groups")
            a = UserAgent(who, gid, groups, umask)
        made.append(a)
        return a

    try:
        yield factory
    finally:
        for a in made:
            a.close()


@pytest.fixture
def agents(users: dict[str, Identity], make_agent: AgentFactory) -> dict[str, UserAgent]:
    """One agent per identity in `users`, umask 022, keyed by name."""
    return {name: make_agent(ident) for name, ident in users.items()}


@pytest.fixture
def helper_fs() -> Iterator[Callable[..., HelperFs]]:
    """helper_fs(script, mountpoint, *args) -> a helper filesystem serving
    there (helpers/helperfs.py); every one started is ended at teardown."""
    started: list[HelperFs] = []

    def start(script: str, mountpoint: Path, *args: str) -> HelperFs:
        fs = start_helper_fs(script, mountpoint, *args)
        started.append(fs)
        return fs

    try:
        yield start
    finally:
        for fs in reversed(started):
            fs.stop()
