#!/usr/bin/env bash
# Builds the guest agent as a static binary and packs it as the VM's initramfs.
#
#   native/agent/build.sh OUT_DIR
#
# Writes OUT_DIR/supermachine-agent and OUT_DIR/initramfs.cpio (newc, holding only /init).
# CARGO_TARGET_DIR is honoured; by default the build goes to ${TMPDIR:-/tmp}, never into the repo.
set -euo pipefail

log() { printf 'agent build: %s\n' "$*" >&2; }
die() { printf 'agent build: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
out_dir="$(cd "$1" && pwd)"

command -v cargo >/dev/null || die "cargo not found (install rustc and cargo, e.g. apt-get install cargo)"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TMPDIR:-/tmp}/supermachine-agent-target-$(id -u)}"
target="$(rustc -vV | sed -n 's/^host: //p')"
[ -n "$target" ] || die "cannot determine the rustc host target"

log "cargo build --release ($target, static) in $CARGO_TARGET_DIR"
# --target keeps the static RUSTFLAGS away from build scripts.
(cd "$here" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --offline --release --locked --quiet --target "$target")
bin="$CARGO_TARGET_DIR/$target/release/supermachine-agent"
[ -x "$bin" ] || die "binary not found at $bin"

# The initramfs has no dynamic loader or libraries: refuse anything dynamically linked.
if command -v readelf >/dev/null; then
    if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
        die "$bin is dynamically linked"
    fi
elif command -v file >/dev/null; then
    file -L "$bin" | grep -Eq 'statically linked|static-pie linked' || die "$bin is not statically linked: $(file -L "$bin")"
else
    ldd "$bin" 2>&1 | grep -Eq 'not a dynamic executable|statically linked' || die "$bin is not statically linked"
fi

stage="$(mktemp -d "${TMPDIR:-/tmp}/supermachine-initramfs.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$bin" "$stage/init"
touch -d '@0' "$stage/init" # reproducible archive
(cd "$stage" && printf 'init\n' | cpio -o -H newc -R 0:0 --quiet) >"$stage/initramfs.cpio"

install -m 0755 "$bin" "$out_dir/.supermachine-agent.tmp.$$"
mv -f "$out_dir/.supermachine-agent.tmp.$$" "$out_dir/supermachine-agent"
install -m 0644 "$stage/initramfs.cpio" "$out_dir/.initramfs.cpio.tmp.$$"
mv -f "$out_dir/.initramfs.cpio.tmp.$$" "$out_dir/initramfs.cpio"
log "wrote $out_dir/supermachine-agent ($(stat -c %s "$out_dir/supermachine-agent") bytes) and initramfs.cpio"
