#!/usr/bin/env bash
# Demo: two users, the same files through one credfs mount, different answers,
# each the same as the backing filesystem gives that user directly.
# Run as root on Debian 12; it runs scripts/setup.sh first.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
CREDFS="$ROOT/.venv/bin/credfs"

DEMO=/tmp/credfs-demo
SRC=$DEMO/src
MNT=$DEMO/mnt

is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

cleanup() (  # a subshell, so that set +e stays in here
    set +e
    if is_mounted "$MNT"; then
        echo "demo: credfs umount $MNT"
        timeout 20 "$CREDFS" umount "$MNT" || true
        # Fall back to a lazy unmount so the demo never leaves a mount behind.
        if is_mounted "$MNT"; then
            echo "demo: lazy unmount of $MNT"
            timeout 20 umount -l "$MNT"
        fi
    fi
    # Never rm -rf through a live mount.
    if ! is_mounted "$MNT"; then
        rm -rf "$DEMO"
    fi
)

cleanup  # leftovers of an interrupted earlier run
trap cleanup EXIT

echo "demo: building the backing tree in $SRC"
mkdir -p "$SRC" "$MNT"
chmod 0755 "$DEMO" "$SRC" "$MNT"
cd /  # every user below must be able to search its cwd

echo "for everyone" >"$SRC/public.txt"
chmod 0644 "$SRC/public.txt"

echo "for group 3001 only" >"$SRC/group-3001.txt"
chown 0:3001 "$SRC/group-3001.txt"
chmod 0640 "$SRC/group-3001.txt"

mkdir "$SRC/alice-private"
echo "alice's notes" >"$SRC/alice-private/notes.txt"
chown -R 2001:2001 "$SRC/alice-private"
chmod 0700 "$SRC/alice-private"
chmod 0600 "$SRC/alice-private/notes.txt"

mkdir "$SRC/dropbox"  # writable by group 3001
chown 0:3001 "$SRC/dropbox"
chmod 0770 "$SRC/dropbox"

ls -ln "$SRC"

echo
echo "demo: $CREDFS mount $SRC $MNT"
"$CREDFS" mount "$SRC" "$MNT"
findmnt --mountpoint "$MNT"

# outcome CMD...: run CMD as the user in ${ids[@]}, one line: "ok: output" or
# "DENIED/FAILED: reason".
outcome() {
    local out
    if out=$(setpriv "${ids[@]}" -- "$@" 2>&1); then
        printf 'ok: %s' "${out:-(no output)}"
    else
        printf 'DENIED/FAILED: %s' "${out##*: }"
    fi
}
# run_as WHO DESCRIPTION RELPATH CMD...: run CMD on RELPATH through the mount and
# directly on the backing dir, and print both outcomes side by side.
run_as() {
    local who=$1 desc=$2 path=$3
    shift 3
    local via direct
    via=$(outcome "$@" "$MNT/$path")
    direct=$(outcome "$@" "$SRC/$path")
    printf '  %-6s %-28s credfs: %-34s direct: %s\n' "$who" "$desc" "${via//$'\n'/ }" \
        "${direct//$'\n'/ }"
}

echo
echo "demo: the same operations as alice (uid 2001, groups 2001,3001) and carol (uid 2003, groups 2003,3002)"
for who in alice carol; do
    if [[ $who == alice ]]; then
        ids=(--reuid=2001 --regid=2001 "--groups=2001,3001")
    else
        ids=(--reuid=2003 --regid=2003 "--groups=2003,3002")
    fi
    run_as "$who" "cat public.txt" public.txt cat
    run_as "$who" "cat group-3001.txt" group-3001.txt cat
    run_as "$who" "ls alice-private" alice-private ls
    run_as "$who" "cat alice-private/notes.txt" alice-private/notes.txt cat
    run_as "$who" "touch dropbox/by-$who" "dropbox/by-$who" touch
done

echo
echo "demo: files created through the mount belong to their creator (ls -ln $SRC/dropbox):"
ls -ln "$SRC/dropbox"

echo
echo "demo: $CREDFS umount $MNT"
"$CREDFS" umount "$MNT"
is_mounted "$MNT" && { echo "demo: still mounted after credfs umount" >&2; exit 1; }

# --- part 2: the Android-style media provider (policies/android-media.toml) ---
MEDIA=$DEMO/media
echo
echo "demo: a media tree owned by the media service (uid 1023) in $MEDIA"
mkdir -p "$MEDIA"/{DCIM,Pictures,Movies,Music,Download,Documents} "$MEDIA"/Android/{data,media,obb}
chown -R 1023:1023 "$MEDIA"
chmod -R 0770 "$MEDIA"
cp "$ROOT/policies/android-media.toml" "$ROOT/policies/android-apps.list" "$DEMO/"
echo "demo: apps (from android-apps.list):"
grep -v '^#' "$DEMO/android-apps.list" | sed 's/^/  /'
echo "demo: $CREDFS mount $MEDIA $MNT --mounter 1023:1023 --policy android-media.toml"
"$CREDFS" mount "$MEDIA" "$MNT" --mounter 1023:1023 --policy "$DEMO/android-media.toml"

app() { local uid=$1; shift; setpriv --reuid="$uid" --regid="$uid" --clear-groups -- "$@"; }
# A photo with GPS, taken by the camera app (10001) through the mount.
"$ROOT/.venv/bin/python" -c 'from PIL import Image; Image.new("RGB", (32, 24), (200, 60, 30)).save("/tmp/credfs-demo/photo.jpg")'
exiftool -q -overwrite_original -GPSLatitude=48.8584 -GPSLatitudeRef=N \
    -GPSLongitude=2.2945 -GPSLongitudeRef=E "$DEMO/photo.jpg"
chmod 0644 "$DEMO/photo.jpg"
app 10001 cp "$DEMO/photo.jpg" "$MNT/DCIM/eiffel.jpg"
app 10001 mkdir "$MNT/Android/data/com.example.camera"
app 10001 sh -c "echo 'camera settings' > $MNT/Android/data/com.example.camera/settings"
gps() {
    local g
    g=$(app "$1" exiftool -s3 -GPSPosition "$MNT/DCIM/eiffel.jpg" 2>&1 | head -1)
    echo "${g:-(none: location redacted)}"
}
echo "demo: what each app gets (the backing file is owned by $(stat -c %u "$MEDIA/DCIM/eiffel.jpg"))"
printf '  %-22s ls DCIM: %-14s GPS: %-32s ls Android/data: %s\n' \
    "camera (owner)" "$(app 10001 ls "$MNT/DCIM" | tr '\n' ' ')" "$(gps 10001)" \
    "$(app 10001 ls "$MNT/Android/data" | tr '\n' ' ')"
printf '  %-22s ls DCIM: %-14s GPS: %-32s ls Android/data: %s\n' \
    "gallery (no location)" "$(app 10002 ls "$MNT/DCIM" | tr '\n' ' ')" \
    "$(gps 10002)" "$(app 10002 ls "$MNT/Android/data" | tr '\n' ' ')"
printf '  %-22s ls DCIM: %-14s\n' "notes (no media)" "$(app 10004 ls "$MNT/DCIM" | tr '\n' ' ')"
echo "  gallery deletes the camera's photo: $(app 10002 rm "$MNT/DCIM/eiffel.jpg" 2>&1 | sed 's/.*: //' || true)"
"$CREDFS" umount "$MNT"
is_mounted "$MNT" && { echo "demo: still mounted after credfs umount" >&2; exit 1; }
echo "demo: done"
