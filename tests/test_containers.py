"""containers/: the entrypoint on real mounts, the examples through linters, and a
rootless container scenario made the way rootless engines make it.

No container engine runs here, so the Containerfile, compose file and pod are
checked by linters and schemas (each linter is also shown a bad file, so that a
linter that checks nothing fails the test), and the entrypoint, which is what
the image runs, is exercised directly: real mounts, real signals.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agents import UserAgent
from helpers.mounts import is_mounted, kill_and_unmount, mounts_at
from helpers.userns import HostUser, NsAgent

REPO = Path(__file__).resolve().parent.parent
CONTAINERS = REPO / "containers"
ENTRYPOINT = CONTAINERS / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
NS = [(0, 100000, 65536)]
TIMEOUT = 30.0


def _tool(name: str) -> str:
    """A linter from the venv or PATH; a missing one fails (scripts/setup.sh installs it)."""
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: run scripts/setup.sh"
    return found


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False, **kw)  # type: ignore[call-overload]


# -- linters ---------------------------------------------------------------------------

LINTERS = {
    "shellcheck": (["shellcheck", "-s", "sh", "{f}"], ENTRYPOINT, "#!/bin/sh\nrm -rf $1/*\n"),
    "hadolint": (["hadolint", "--no-color", "{f}"], CONTAINERS / "Containerfile",
                 "FROM debian\nRUN cd /tmp && apt-get install foo\n"),
    "yamllint": (["yamllint", "-s", "-c", str(CONTAINERS / ".yamllint"), "{f}"],
                 CONTAINERS / "compose.yaml", "---\na: 1\na: 2\n"),
    "compose-spec": (["check-jsonschema", "--builtin-schema", "vendor.compose-spec", "{f}"],
                     CONTAINERS / "compose.yaml", "---\nservices:\n  x:\n    imgae: debian\n"),
    "kubernetes": (["kubernetes-validate", "--strict", "{f}"], CONTAINERS / "pod.yaml",
                   "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"
                   "spec:\n  containers:\n    - name: x\n      imagee: debian\n"),
}


@pytest.mark.parametrize("linter", sorted(LINTERS))
def test_container_files_pass_their_linter(linter: str, tmp_path: Path) -> None:
    argv, target, bad = LINTERS[linter]
    argv = [_tool(argv[0]), *argv[1:]]
    ok = _run([a.replace("{f}", str(target)) for a in argv], cwd=REPO)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    if linter == "yamllint":  # the pod too
        pod = _run([a.replace("{f}", str(CONTAINERS / "pod.yaml")) for a in argv])
        assert pod.returncode == 0, pod.stdout + pod.stderr
    broken = tmp_path / target.name
    broken.write_text(bad)
    refused = _run([a.replace("{f}", str(broken)) for a in argv])
    assert refused.returncode != 0, f"{linter} accepted a broken file: {refused.stdout}"


# -- the entrypoint, for real -------------------------------------------------------------


@pytest.fixture
def volume(backing: Path, mnt: Path) -> Iterator[tuple[Path, Path]]:
    """A host user's directory (1500) with a host-root-only file in it."""
    (backing / "home").mkdir()
    os.chown(backing / "home", 1500, 100)
    (backing / "home/own").write_text("mine")
    os.chown(backing / "home/own", 1500, 100)
    (backing / "secret").write_text("root only")
    (backing / "secret").chmod(0o600)
    yield backing, mnt
    kill_and_unmount(mnt)


def _env(backing: Path, mnt: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "CREDFS_COMMAND": f"{sys.executable} -m credfs",
           "CREDFS_SOURCE": str(backing), "CREDFS_MOUNTPOINT": str(mnt),
           "CREDFS_UID_MAP": "100000:1500:1", "CREDFS_GID_MAP": "100000:100:1"}
    env.update(extra)
    return {k: v for k, v in env.items() if v}


def _start(env: dict[str, str], mnt: Path, log: Path, prefix: list[str] | None = None
           ) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([*(prefix or []), "sh", str(ENTRYPOINT)], env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not any(m.fstype.startswith("fuse") for m in mounts_at(mnt)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(TIMEOUT)
            pytest.fail(f"entrypoint did not mount: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)  # what docker stop and a pod deletion send
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(TIMEOUT)
        raise


@pytest.mark.parametrize("caps", ["all", "minimal"])
def test_entrypoint_serves_the_volume_and_stops_cleanly_on_sigterm(
        volume: tuple[Path, Path], workdir: Path, caps: str) -> None:
    backing, mnt = volume
    # "minimal": the container's capability set from compose.yaml, bounding set
    # included (no SETPCAP), as a container runtime would start it.
    prefix = (["setpriv", "--bounding-set=-all,+sys_admin,+setuid,+setgid",
               "--inh-caps=-all"] if caps == "minimal" else None)
    proc = _start(_env(backing, mnt), mnt, workdir / "entry.log", prefix)
    try:
        with NsAgent(NS, NS, 0, 0, [0]) as croot:
            assert croot.do("stat", str(mnt / "home"))[1]["uid"] == 0  # its own
            assert croot.do("read", str(mnt / "secret")) == ("err", 13)
            assert croot.do("write", str(mnt / "home/new"), b"x", os.O_CREAT) == ("ok", 1)
        st = os.stat(backing / "home/new")
        assert (st.st_uid, st.st_gid) == (1500, 100)
    finally:
        code = _stop(proc)
    assert code == 0, (workdir / "entry.log").read_text()
    assert not is_mounted(mnt)
    assert "SIGTERM: unmounting" in (workdir / "entry.log").read_text()


@pytest.mark.parametrize(("env", "message"), [
    ({"CREDFS_SOURCE": ""}, "CREDFS_SOURCE is not set"),
    ({"CREDFS_MOUNTPOINT": ""}, "CREDFS_MOUNTPOINT is not set"),
    ({"CREDFS_SOURCE": "/nonexistent"}, "CREDFS_SOURCE=/nonexistent: not a directory"),
    ({"CREDFS_CREDS": "root"}, "CREDFS_CREDS=root: must be caller or mounter"),
    ({"CREDFS_UID_MAP": "100000:1500"}, "CREDFS_UID_MAP=100000:1500: expected"),
    ({"CREDFS_GID_MAP": "x"}, "CREDFS_GID_MAP=x: expected"),
    ({"CREDFS_POLICY": "/nonexistent.toml"}, "CREDFS_POLICY=/nonexistent.toml: not a readable"),
    ({"CREDFS_CACHE": "forever"}, "CREDFS_CACHE=forever: must be none, auto or always"),
    # Well-formed for the shell, refused by credfs itself:
    ({"CREDFS_UID_MAP": "0:1000:10,5:2000:10"}, "--uid-map: ranges 0:1000:10 and 5:2000:10"),
    ({"CREDFS_OPTIONS": "bogus"}, "-o bogus: unknown mount option"),
])
def test_entrypoint_refuses_a_bad_environment_in_one_line(
        volume: tuple[Path, Path], env: dict[str, str], message: str) -> None:
    backing, mnt = volume
    r = _run(["sh", str(ENTRYPOINT)], env=_env(backing, mnt, **env), cwd=REPO)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(mnt)


# -- rootless, as rootless engines do it -------------------------------------------------

SCRIPT = r"""
cd "$1" || exit 1
report() { if "$@" >/dev/null 2>&1; then echo "$*: ok"; else echo "$*: refused"; fi; }
echo "home owner $(stat -c %u:%g home)"
echo "own owner $(stat -c %u:%g home/own)"
report cat home/own
report cat secret
report touch home/created
report mkdir home/dir
report touch made-at-top
report chmod 600 home/own
report rm -f secret
echo "created owner $(stat -c %u:%g home/created)"
"""


def test_rootless_container_sees_the_host_users_files_as_its_own(
        volume: tuple[Path, Path], native: Path, workdir: Path) -> None:
    """The host user 1500 makes a user namespace the rootless way (util-linux
    unshare, shadow's newuidmap/newgidmap, its /etc/subuid range), its root is
    host 100000, and credfs (started by the entrypoint) maps 100000 to 1500.
    Everything the container's root does there must come out as the host user
    doing it natively, with the host user's ids shown as the container's 0."""
    backing, mnt = volume
    shutil.copytree(backing, native, dirs_exist_ok=True, symlinks=True)
    for p in ("home", "home/own"):
        os.chown(native / p, 1500, 100)
    script = workdir / "scenario.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    as_host_user = ["setpriv", "--reuid", "1500", "--regid", "100", "--clear-groups"]
    proc = _start(_env(backing, mnt), mnt, workdir / "entry.log")
    try:
        with HostUser(1500, "credfs-test-host", 100000, 65536):
            inside = _run([*as_host_user, "unshare", "--user", "--map-users=100000,0,65536",
                           "--map-groups=100000,0,65536", "--setuid", "0", "--setgid", "0",
                           "--", "sh", str(script), str(mnt)])
            natively = _run([*as_host_user, "sh", str(script), str(native)])
    finally:
        assert _stop(proc) == 0
    assert inside.returncode == 0 and natively.returncode == 0, (inside, natively)
    assert inside.stderr == "" and natively.stderr == ""
    # Owners: the host user's 1500:100 is the container's 0:0.
    assert natively.stdout.replace("1500:100", "0:0") == inside.stdout
    for line in ("home owner 0:0", "cat secret: refused", "touch home/created: ok",
                 "touch made-at-top: refused", "created owner 0:0"):
        assert line in inside.stdout.splitlines()
    st = os.stat(backing / "home/created")
    assert (st.st_uid, st.st_gid) == (1500, 100)
    assert (backing / "secret").exists()


def test_a_process_outside_the_map_is_refused_not_served_as_the_daemon(
        volume: tuple[Path, Path], workdir: Path) -> None:
    backing, mnt = volume
    proc = _start(_env(backing, mnt), mnt, workdir / "entry.log")
    try:
        with UserAgent(1500, 100, [100]) as host_user:  # a backing id is no view id
            assert host_user.do("read", str(mnt / "home/own")) == ("err", 13)
    finally:
        assert _stop(proc) == 0
