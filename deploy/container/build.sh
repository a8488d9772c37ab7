#!/bin/sh
# Builds the supermachine server image from this checkout:
#   1. `npm run pack:all` makes the two release tarballs (the package and its prebuilt guest
#      artifacts; setup builds the kernel and agent first when the cache lacks them), unless
#      --tarballs names a directory that already holds them;
#   2. a temporary build context gets the Containerfile and the two tarballs;
#   3. `podman build` (or `buildah bud`) builds it, in Docker format so the HEALTHCHECK is kept.
#
# Usage: deploy/container/build.sh [--base IMAGE] [--tag TAG] [--tarballs DIR] [-- BUILD-ARGS...]
#   --base IMAGE    a Debian bookworm image with Node >= 20 (default: node:20-bookworm-slim)
#   --tag TAG       the image's name (default: localhost/supermachine:<version>)
#   --tarballs DIR  take supermachine-<v>.tgz and supermachine-guest-linux-x64-<v>.tgz from DIR
#   after --         passed to podman build / buildah bud as they are (--network host, ...)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
base=
tag=
tarballs=
while [ $# -gt 0 ]; do
  case $1 in
    --base) base=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --tarballs) tarballs=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

version=$(node -p "require('$root/package.json').version")
tag=${tag:-localhost/supermachine:$version}
if command -v podman >/dev/null; then builder="podman build"
elif command -v buildah >/dev/null; then builder="buildah bud"
else echo "build.sh: neither podman nor buildah is installed (apt-get install podman)" >&2; exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
if [ -z "$tarballs" ]; then
  echo "build.sh: npm run pack:all" >&2
  (cd "$root" && npm run --silent pack:all >&2)
  tarballs=$root/out/packages
fi
for f in "supermachine-$version.tgz" "supermachine-guest-linux-x64-$version.tgz"; do
  [ -f "$tarballs/$f" ] || { echo "build.sh: $tarballs/$f is missing (npm run pack:all makes it)" >&2; exit 1; }
  cp "$tarballs/$f" "$ctx/"
done
cp "$here/Containerfile" "$ctx/Containerfile"

set -- --format docker -f "$ctx/Containerfile" -t "$tag" ${base:+--build-arg "BASE=$base"} "$@" "$ctx"
echo "build.sh: $builder $*" >&2
$builder "$@"
echo "$tag"
