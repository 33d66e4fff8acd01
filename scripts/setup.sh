#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, run as root: system packages
# (only those missing), then .venv in the repo root with credfs installed
# editable with its test extras. Safe to run again: it skips what is done.
#
# Environment: PYTHON (default python3) picks the interpreter for the venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.credfs-setup"
# fuse3: fusermount3 and the kernel glue; libfuse3-dev, pkg-config, gcc,
# python3-dev: to build pyfuse3; libcap-dev: python-prctl; acl, attr: setfacl
# and setfattr for tests; util-linux: mount, umount, setpriv, unshare; uidmap:
# newuidmap/newgidmap for the rootless-container test; shellcheck: lints
# containers/entrypoint.sh in the tests; libimage-exiftool-perl, ffmpeg:
# independent writers and reader of location metadata for the location-redaction
# tests (tests/test_location.py). curl, patch: scripts/build-pyfuse3.sh fetches
# libfuse 3.17 from Debian's source pool and patches pyfuse3 (FUSE passthrough).
PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev libcap-dev acl attr util-linux
          uidmap shellcheck libimage-exiftool-perl ffmpeg curl patch)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs Debian packages and credfs tests mount FUSE)"

# --- Debian packages --------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg -s also succeeds for removed-but-configured packages: check the state.
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) != installed ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}" </dev/null
else
    say "Debian packages present: ${PACKAGES[*]}"
fi

# --- Python and the venv ----------------------------------------------------
version_ok() {  # $1: interpreter; true when it is Python >= 3.11
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; install Python >= 3.11"
version_ok "$PYTHON" || die "$("$PYTHON" -V 2>&1) is too old (credfs needs Python >= 3.11); set PYTHON to a newer one"

if [[ -x $VENV/bin/python ]] && version_ok "$VENV/bin/python"; then
    say "venv present: $VENV ($("$VENV/bin/python" -V 2>&1))"
else
    # A venv whose interpreter went away or is too old cannot be repaired in place.
    [[ -e $VENV ]] && { say "removing unusable venv $VENV"; rm -rf "$VENV"; }
    say "creating venv $VENV with $(command -v "$PYTHON") ($("$PYTHON" -V 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi

# --- pyfuse3 with FUSE passthrough (before credfs, which then finds it) --------
status=0
bash "$ROOT/scripts/build-pyfuse3.sh" "$VENV" || status=$?
if ((status == 3)); then
    say "WARNING: libfuse 3.17 source unavailable: pyfuse3 from PyPI, credfs without passthrough"
elif ((status)); then
    die "building pyfuse3 with passthrough failed (scripts/build-pyfuse3.sh)"
fi

# --- credfs and its test dependencies ---------------------------------------
# Reinstall when pyproject.toml changed, or when anything the tests need does
# not import from outside the repo (so the editable install really maps credfs).
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $("$VENV/bin/python" -V 2>&1)"
installed_ok() {
    [[ -f $STAMP && $(cat "$STAMP") == "$want" && -x $VENV/bin/credfs ]] &&
        (cd / && "$VENV/bin/python" -c 'import credfs, pyfuse3, trio, prctl, pytest, pytest_timeout, hypothesis, PIL' 2>/dev/null) &&
        [[ -x $VENV/bin/ruff ]]
}
if installed_ok; then
    say "credfs and test dependencies already installed"
else
    say "pip install -e '.[test]' into $VENV"
    rm -f "$STAMP"
    (cd "$ROOT" && PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$VENV/bin/python" -m pip install --progress-bar off -q -e '.[test]' </dev/null)
    printf '%s\n' "$want" >"$STAMP"
fi
say "done"
