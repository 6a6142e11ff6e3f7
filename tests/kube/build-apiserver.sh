#!/usr/bin/env bash
# Builds kube-apiserver and kube-proxy from Debian bookworm's `kubernetes`
# source package (1.20.2, vendored) into $1 (default:
# ${WEFT_CACHE_DIR:-/var/cache/weft}/kube, outside the checkout so every clone
# on the machine shares them), once: a second run finds the binaries and
# exits. Recipe and pitfalls: ../shared/notes/kube-apiserver.md.
set -euo pipefail
out="${1:-${WEFT_CACHE_DIR:-/var/cache/weft}/kube}"
ver=1.20.2
missing() { for b in kube-apiserver kube-proxy; do [ -x "$out/$b-$ver" ] || echo "$b"; done; }
if [ -z "$(missing)" ]; then
  echo "==> kube: kube-apiserver and kube-proxy cached in $out"
  exit 0
fi
mkdir -p "$out"
# One build at a time: a second caller waits for the first, then finds the binaries.
exec 9>"$out/.build.lock"
flock 9
if [ -z "$(missing)" ]; then
  echo "==> kube: kube-apiserver and kube-proxy cached in $out"
  exit 0
fi
build=$(missing | tr '\n' ' ')
export DEBIAN_FRONTEND=noninteractive
need=""
for p in golang-go make rsync golang-github-modern-go-reflect2-dev etcd-server etcd-client openssl dpkg-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  echo "==> kube: installing$need"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $need >/dev/null
fi
# deb822 format, with the same Signed-By as the system's bookworm entry
# (a one-line deb-src with a different Signed-By breaks every apt call).
src_list=/etc/apt/sources.list.d/weft-bookworm-src.sources
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version: 1.20.2'; then
  echo "==> kube: enabling deb-src for bookworm"
  printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src_list"
  apt-get update -q >/dev/null || { rm -f "$src_list"; apt-get update -q >/dev/null; echo "deb-src for bookworm could not be enabled" >&2; exit 1; }
fi
work="$out/src"
rm -rf "$work" && mkdir -p "$work"
echo "==> kube: fetching Debian's kubernetes 1.20.2 source"
(cd "$work" && apt-get source --download-only kubernetes >/dev/null 2>&1)
(cd "$work" && dpkg-source -x --skip-patches kubernetes_*.dsc tree >/dev/null)
tree="$work/tree"
# reflect2 1.0.1 (vendored) crashes under Go >= 1.18: use Debian's 1.0.2.
rm -f "$tree"/vendor/github.com/modern-go/reflect2/*.go
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$tree/vendor/github.com/modern-go/reflect2/"
mkdir -p "$tree/.go/src/k8s.io"
ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
what=$(for b in $build; do printf 'cmd/%s ' "$b"; done)
echo "==> kube: building $build(about 3-5 minutes on 2 cores)"
(cd "$tree/.go/src/k8s.io/kubernetes" && GOPATH="$tree/.go" CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor make WHAT="${what% }" >"$out/build.log" 2>&1) || { tail -30 "$out/build.log"; exit 1; }
for b in $build; do
  cp "$tree/_output/bin/$b" "$out/$b-$ver"
  echo "==> kube: built $out/$b-$ver"
done
rm -rf "$work"
