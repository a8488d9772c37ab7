#!/bin/sh
# Makes a stand-in for node:20-bookworm-slim without a container registry: a minimal Debian
# bookworm (mmdebstrap, from the host's apt sources) with this host's Node binary, npm and Node's
# headers (node-gyp builds zstd-napi against them) copied into /usr/local, as the official image
# lays them out, then imports it as a local image. The host's own CA certificates
# (/usr/local/share/ca-certificates) go in too, with NODE_EXTRA_CA_CERTS pointing Node at the
# system bundle, so builds work behind a TLS-intercepting proxy as they do on the host.
#   deploy/container/local-base.sh [image-name]     (default: localhost/node-bookworm-local:20)
# Build on it with: deploy/container/build.sh --base <image-name>
# Needs root (or a working mmdebstrap mode), mmdebstrap, and podman or buildah.
set -eu
name=${1:-localhost/node-bookworm-local:20}
node=$(command -v node)
case $("$node" --version) in v2[0-9]*|v[3-9][0-9]*) ;; *) echo "local-base.sh: $node is not Node >= 20" >&2; exit 1 ;; esac
npmdir=$(dirname "$(readlink -f "$(command -v npm)")")/..
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mmdebstrap --variant=minbase --include=ca-certificates,libstdc++6 \
  --customize-hook="copy-in $node /usr/local/bin" \
  --customize-hook="mkdir -p \$1/usr/local/lib/node_modules" \
  --customize-hook="cp -a $npmdir \$1/usr/local/lib/node_modules/npm" \
  --customize-hook="mkdir -p \$1/usr/local/include && cp -a $(dirname "$node")/../include/node \$1/usr/local/include/node" \
  --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" && chroot "$1" update-ca-certificates >/dev/null; fi' \
  --customize-hook='ln -s ../lib/node_modules/npm/bin/npm-cli.js "$1/usr/local/bin/npm"' \
  --customize-hook='ln -s ../lib/node_modules/npm/bin/npx-cli.js "$1/usr/local/bin/npx"' \
  bookworm "$work/base.tar"
if command -v podman >/dev/null; then podman import --change 'CMD ["node"]' --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' "$work/base.tar" "$name"
else c=$(buildah from scratch) && buildah add "$c" "$work/base.tar" / && buildah config --cmd node --env NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt "$c" && buildah commit "$c" "$name" && buildah rm "$c"
fi
echo "$name"
