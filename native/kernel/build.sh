#!/usr/bin/env bash
# Build the supermachine guest kernel (an uncompressed x86_64 vmlinux booted by
# QEMU microvm through the PVH entry point) from Debian's linux-source-6.1.
#
#   native/kernel/build.sh OUT_DIR
#
# Writes OUT_DIR/vmlinux, OUT_DIR/config (the final .config) and
# OUT_DIR/build.log (full make output). Progress goes to stderr; the only line
# on stdout is the path of the finished vmlinux.
#
# Environment:
#   SM_KERNEL_SOURCE  kernel source tarball (default /usr/src/linux-source-6.1.tar.xz,
#                     Debian package linux-source-6.1)
#   SM_KERNEL_JOBS    make -j value (default: nproc + 1)
#   TMPDIR            where the temporary build tree goes (needs ~1.5 GB)
#
# Build dependencies (Debian): linux-source-6.1 build-essential bc bison flex
# libelf-dev xz-utils (plus squashfs-tools/cpio only for testing images).
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR" >&2; exit 2; }
[[ $# -eq 1 && -n "$1" ]] || usage

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT=$SCRIPT_DIR/config.fragment
SRC_TARBALL=${SM_KERNEL_SOURCE:-/usr/src/linux-source-6.1.tar.xz}
JOBS=${SM_KERNEL_JOBS:-$(( $(nproc) + 1 ))}

mkdir -p -- "$1"
OUT_DIR=$(cd -- "$1" && pwd)
LOG=$OUT_DIR/build.log
TMP_VMLINUX=$OUT_DIR/.vmlinux.partial.$$
TMP_CONFIG=$OUT_DIR/.config.partial.$$

START=$SECONDS
stage() { printf '[kernel %4ds] %s\n' "$(( SECONDS - START ))" "$*" >&2; }
fail() {
  echo "kernel build failed: $*" >&2
  if [[ -s "$LOG" ]]; then
    echo "--- last 40 lines of $LOG ---" >&2
    tail -n 40 -- "$LOG" >&2
  fi
  exit 1
}
# Run a command with all its output appended to the log. It runs in its own
# session (process group) in the background so that a signal to this script
# is handled at once and cleanup() can stop the whole group (make and its jobs).
CHILD=
run() {
  local rc=0
  setsid "$@" >>"$LOG" 2>&1 </dev/null &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=
  (( rc == 0 )) || fail "command failed (exit $rc): $*"
}

WORK=
cleanup() {
  if [[ -n "$CHILD" ]]; then
    kill -TERM -- "-$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  [[ -n "$WORK" ]] && rm -rf -- "$WORK"
  rm -f -- "$TMP_VMLINUX" "$TMP_CONFIG"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- preflight -------------------------------------------------------------
[[ -r "$FRAGMENT" ]] || fail "missing $FRAGMENT"
[[ -r "$SRC_TARBALL" ]] || fail "missing $SRC_TARBALL (Debian package linux-source-6.1)"
missing=()
for tool in make gcc ld bc bison flex xz tar patch setsid; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ -e /usr/include/libelf.h || -e /usr/include/elfutils/libelf.h ]] || missing+=("libelf.h (libelf-dev)")
(( ${#missing[@]} == 0 )) || fail "missing build tools: ${missing[*]} (Debian: build-essential bc bison flex libelf-dev xz-utils patch)"

: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sm-kernel.XXXXXX")
SRC=$WORK/linux

# Keep the caller's environment from steering kbuild.
unset ARCH CROSS_COMPILE KCONFIG_CONFIG KBUILD_OUTPUT LOCALVERSION MAKEFLAGS MFLAGS MAKELEVEL \
      KCFLAGS KCPPFLAGS KAFLAGS INSTALL_PATH O
export KBUILD_BUILD_USER=supermachine KBUILD_BUILD_HOST=supermachine
# Reproducible version banner: the fragment's mtime is a stable input.
KBUILD_BUILD_TIMESTAMP=$(date -u -r "$FRAGMENT" '+%Y-%m-%d %H:%M:%S UTC')
export KBUILD_BUILD_TIMESTAMP
MAKE=(make -C "$SRC" ARCH=x86_64)

# --- extract ---------------------------------------------------------------
stage "extracting $(basename -- "$SRC_TARBALL")"
mkdir -p -- "$SRC"
run tar -xJf "$SRC_TARBALL" -C "$SRC" --strip-components=1
[[ -f "$SRC/Makefile" ]] || fail "unexpected layout in $SRC_TARBALL"

# --- patch -----------------------------------------------------------------
shopt -s nullglob
patches=("$SCRIPT_DIR"/patches/*.patch)
shopt -u nullglob
if (( ${#patches[@]} > 0 )); then
  stage "applying ${#patches[@]} patch(es) from patches/"
  for p in "${patches[@]}"; do
    echo "=== patch -p1 < $p" >>"$LOG"
    patch -d "$SRC" -p1 --forward --batch <"$p" >>"$LOG" 2>&1 || fail "patch $(basename -- "$p") does not apply"
  done
fi

# --- configure -------------------------------------------------------------
stage "configuring (tinyconfig + config.fragment + olddefconfig)"
run "${MAKE[@]}" tinyconfig
# -m: merge only; olddefconfig below resolves dependencies and defaults.
run env -C "$SRC" scripts/kconfig/merge_config.sh -m .config "$FRAGMENT"
run "${MAKE[@]}" olddefconfig

# Every CONFIG_X=value line of the fragment must be in the final .config
# verbatim, and every "# CONFIG_X is not set" line must not be set.
# (make olddefconfig silently drops symbols whose dependencies are off.)
stage "verifying the configuration against config.fragment"
bad=()
while IFS= read -r line; do
  line=${line%$'\r'}
  if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF -- "$line" "$SRC/.config" || {
      got=$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$SRC/.config" || true)
      bad+=("$line (final: ${got:-absent})")
    }
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    if got=$(grep -E "^${BASH_REMATCH[1]}=" "$SRC/.config"); then
      bad+=("$line (final: $got)")
    fi
  fi
done <"$FRAGMENT"
if (( ${#bad[@]} > 0 )); then
  {
    echo "kernel build failed: ${#bad[@]} config.fragment line(s) did not survive make olddefconfig"
    echo "(usually a dependency that tinyconfig disabled; add it to the fragment):"
    printf '  %s\n' "${bad[@]}"
  } >&2
  exit 1
fi

# --- compile ---------------------------------------------------------------
stage "compiling vmlinux (make -j$JOBS; log: $LOG)"
run "${MAKE[@]}" -j"$JOBS" vmlinux
[[ -s "$SRC/vmlinux" ]] || fail "make succeeded but $SRC/vmlinux is missing"
# QEMU's PVH loader needs the Xen ELF note (XEN_ELFNOTE_PHYS32_ENTRY).
if command -v readelf >/dev/null 2>&1; then
  readelf -n "$SRC/vmlinux" 2>/dev/null | grep -q 'Xen' || fail "vmlinux has no Xen/PVH ELF note"
fi

# --- install (atomic: temp file in OUT_DIR, then rename) -------------------
stage "installing into $OUT_DIR"
cp -- "$SRC/vmlinux" "$TMP_VMLINUX"
cp -- "$SRC/.config" "$TMP_CONFIG"
chmod 0644 -- "$TMP_VMLINUX" "$TMP_CONFIG"
mv -f -- "$TMP_CONFIG" "$OUT_DIR/config"
mv -f -- "$TMP_VMLINUX" "$OUT_DIR/vmlinux"

release=$("${MAKE[@]}" -s kernelrelease 2>/dev/null || echo '?')
stage "done: $OUT_DIR/vmlinux (Linux $release, $(( $(stat -c %s "$OUT_DIR/vmlinux") / 1024 )) KiB)"
echo "$OUT_DIR/vmlinux"
