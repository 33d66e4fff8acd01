#!/usr/bin/env bash
# Builds pyfuse3 with kernel FUSE passthrough into the venv given as $1.
#
# Debian 12 ships libfuse 3.14, which cannot ask the kernel for passthrough
# (FOPEN_PASSTHROUGH needs libfuse >= 3.16), and pyfuse3 3.5 has no field for
# a backing file. So: libfuse 3.17.2 from Debian's own source package (trixie;
# checksum pinned), built as a shared library inside the venv, and pyfuse3
# 3.5.0 from PyPI with the scripts/pyfuse3-*.patch files applied in name order
# (pyfuse3-dirops.patch: Operations.enable_parallel_dirops, FUSE_PARALLEL_DIROPS;
# pyfuse3-passthrough.patch: FileInfo.backing_id,
# FileInfo.noflush, Operations.enable_passthrough and .enable_killpriv_v2;
# pyfuse3-readdir.patch: plain readdir, Operations.enable_readdirplus_auto;
# pyfuse3-readpack.patch: PackedListing, listings as ready-made FUSE_READDIR records;
# pyfuse3-session.patch: a request loop without a task switch per request;
# pyfuse3-sessionpoll.patch: main(poll_us=...), the loop polls /dev/fuse for
# the next request in an adaptive window before sleeping on it;
# pyfuse3-unique.patch: RequestContext.unique, the request id the kernel gave;
# pyfuse3-writeflags.patch: Operations.enable_write_flags, write() gets the
# open file's flags as they are at that write),
# linked to it by rpath.
# The system's fusermount3 and kernel are used as they are.
#
# Idempotent: does nothing when the venv's pyfuse3 was built from these patches
# (a stamp in the venv holds their sha256).
# Exit status 3: the pinned libfuse source could not be fetched (credfs then
# runs with the stock pyfuse3, without passthrough); anything else non-zero is
# a build failure.
set -euo pipefail

VENV=$(realpath -m "${1:?usage: build-pyfuse3.sh VENV}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FUSE_VERSION=3.17.2
FUSE_TARBALL=fuse3_${FUSE_VERSION}.orig.tar.gz
FUSE_URL=http://deb.debian.org/debian/pool/main/f/fuse3/$FUSE_TARBALL
FUSE_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
PYFUSE3_VERSION=3.5.0
PREFIX=$VENV/libfuse-$FUSE_VERSION
STAMP=$VENV/.credfs-pyfuse3-patch
PATCHES=("$HERE"/pyfuse3-*.patch)  # applied in name order
PATCH_SUM=$(cat "${PATCHES[@]}" | sha256sum | cut -d' ' -f1)

say() { printf 'build-pyfuse3: %s\n' "$*"; }
die() { printf 'build-pyfuse3: error: %s\n' "$*" >&2; exit 1; }

has_passthrough() {
    (cd / && "$VENV/bin/python" -c '
import pyfuse3, sys
sys.exit(not hasattr(pyfuse3.FileInfo(), "backing_id"))' 2>/dev/null)
}
if [[ -f $STAMP && $(cat "$STAMP") == "$PATCH_SUM" ]] && has_passthrough; then
    say "pyfuse3 with passthrough present"
    exit 0
fi
rm -f "$STAMP"

WORK=$(mktemp -d /tmp/credfs-build.XXXXXX)
trap 'rm -rf -- "$WORK"' EXIT
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say "build tools (meson, ninja, cython) into $WORK/tools"
python3 -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q --progress-bar off meson ninja </dev/null

if [[ ! -f $PREFIX/lib/libfuse3.so.4 ]]; then
    say "libfuse $FUSE_VERSION from $FUSE_URL"
    curl -fsS --retry 3 -o "$WORK/$FUSE_TARBALL" "$FUSE_URL" ||
        { printf 'build-pyfuse3: cannot download %s\n' "$FUSE_URL" >&2; exit 3; }
    echo "$FUSE_SHA256  $WORK/$FUSE_TARBALL" | sha256sum -c --quiet ||
        die "$FUSE_TARBALL does not match its pinned sha256"
    tar -xzf "$WORK/$FUSE_TARBALL" -C "$WORK"
    (cd "$WORK/fuse-$FUSE_VERSION" &&
        PATH=$WORK/tools/bin:$PATH meson setup build --prefix="$PREFIX" --libdir=lib \
            -Dexamples=false -Dutils=false -Dtests=false \
            -Dudevrulesdir="$WORK/udev" -Dinitscriptdir= >"$WORK/meson.log" 2>&1 &&
        PATH=$WORK/tools/bin:$PATH meson install -C build >>"$WORK/meson.log" 2>&1) ||
        { tail -30 "$WORK/meson.log" >&2; die "libfuse build failed"; }
fi

say "pyfuse3 $PYFUSE3_VERSION with ${PATCHES[*]##*/}"
"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$WORK" \
    "pyfuse3==$PYFUSE3_VERSION" </dev/null 2> >(grep -v "is ignored: it is neither" >&2)
tar -xzf "$WORK/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$WORK"
src=$WORK/pyfuse3-$PYFUSE3_VERSION
for p in "${PATCHES[@]}"; do
    patch -s -d "$src" -p1 <"$p" || die "${p##*/} does not apply"
done
rm -f "$src/src/pyfuse3/__init__.c"  # generated from the unpatched .pyx: regenerate
PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig LDFLAGS="-Wl,-rpath,$PREFIX/lib" \
    SETUPTOOLS_SCM_PRETEND_VERSION=$PYFUSE3_VERSION \
    "$VENV/bin/python" -m pip install -q --progress-bar off --force-reinstall --no-deps \
    "$src" </dev/null 2> >(grep -v "is ignored: it is neither" >&2) ||
    die "pyfuse3 build failed"
# pyfuse3 imports trio (its one dependency, left out above so that nothing else
# is reinstalled): needed to check the result.
"$VENV/bin/python" -m pip install -q --progress-bar off "trio>=0.22" </dev/null \
    2> >(grep -v "is ignored: it is neither" >&2)
has_passthrough || die "the built pyfuse3 has no FileInfo.backing_id"
printf '%s\n' "$PATCH_SUM" >"$STAMP"
say "pyfuse3 $PYFUSE3_VERSION on libfuse $FUSE_VERSION installed in $VENV"
