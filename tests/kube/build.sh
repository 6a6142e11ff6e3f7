#!/usr/bin/env bash
# Builds the Kubernetes components weft's tests and `cargo xtask cluster` run,
# from Debian bookworm's `kubernetes` source package (1.20.2, vendored), into
# $1 (default: ${WEFT_CACHE_DIR:-/var/cache/weft}/kube, outside the checkout
# so every clone on the machine shares them), once: a second run finds them
# and exits. What it makes, each as NAME-1.20.2:
#   kube-apiserver kube-proxy kubelet kube-controller-manager kube-scheduler
#   kubectl e2e.test   (make, static)
#   agnhost            (the e2e test image's binary, GOPATH mode)
#   pause              (the sandbox image's binary, static C)
#   cluster-dns-HASH   (the lab cluster's DNS, tests/kube/dns/main.go, keyed
#                       by its hash: it builds again when it changes)
# and e2e-repo-1.20.2/, the files of the tree e2e.test reads (--repo-root)
# and the agnhost image takes.
# The source tree with its Go build cache stays in src/, so a component added
# later builds warm. Recipe and pitfalls: ../shared/notes/kube-apiserver.md,
# ../shared/notes/kubernetes.md.
set -euo pipefail
out="${1:-${WEFT_CACHE_DIR:-/var/cache/weft}/kube}"
ver=1.20.2
make_bins="kube-apiserver kube-proxy kubelet kube-controller-manager kube-scheduler kubectl e2e.test"
dns_src="$(cd "$(dirname "$0")" && pwd)/dns/main.go"
dns_bin="$out/cluster-dns-$(sha256sum "$dns_src" | cut -c1-12)"
missing() {
  for b in $make_bins agnhost pause; do [ -x "$out/$b-$ver" ] || echo "$b"; done
  [ -x "$dns_bin" ] || echo cluster-dns
  [ -d "$out/e2e-repo-$ver" ] || echo e2e-repo
}
if [ -z "$(missing)" ]; then
  echo "==> kube: Kubernetes $ver components cached in $out"
  exit 0
fi
mkdir -p "$out"
# One build at a time: a second caller waits for the first, then finds the binaries.
exec 9>"$out/.build.lock"
flock 9
if [ -z "$(missing)" ]; then
  echo "==> kube: Kubernetes $ver components cached in $out"
  exit 0
fi
echo "==> kube: to build: $(missing | tr '\n' ' ')"
export DEBIAN_FRONTEND=noninteractive
need=""
for p in golang-go make rsync golang-github-modern-go-reflect2-dev etcd-server etcd-client openssl dpkg-dev gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  echo "==> kube: installing$need"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $need >/dev/null
fi
work="$out/src"
tree="$work/tree"
if [ ! -f "$tree/.weft-prepared" ]; then
  # A deb-src entry for bookworm, on the mirror and key this machine's own
  # bookworm entry uses (deb822; a one-line deb-src with another Signed-By
  # breaks every apt call).
  src_list=/etc/apt/sources.list.d/weft-bookworm-src.sources
  if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: .*$ver"; then
    read -r uri key < <(
      cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
        /^$/ { if (deb && bw && u != "") { print u, (k == "" ? "-" : k); exit } deb = bw = 0; u = k = "" }
        /^Types:/ && / deb( |$)/ { deb = 1 }
        /^Suites:/ && / bookworm( |$)/ { bw = 1 }
        /^URIs:/ { u = $2 }
        /^Signed-By:/ { k = $2 }
        END { if (deb && bw && u != "") print u, (k == "" ? "-" : k) }'
    ) || true
    if [ -z "${uri:-}" ]; then
      uri=$(awk '$1 == "deb" && $0 ~ / bookworm / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list 2>/dev/null || true)
      key=-
    fi
    if [ -z "${uri:-}" ]; then
      echo "kube: no bookworm 'deb' entry in this machine's apt sources to take the mirror from; add one, or a deb-src for bookworm" >&2
      exit 1
    fi
    echo "==> kube: enabling deb-src for bookworm (mirror of the machine's bookworm entry)"
    {
      printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\n' "$uri"
      [ "$key" = - ] || printf 'Signed-By: %s\n' "$key"
    } > "$src_list"
    apt-get update -q >/dev/null || { rm -f "$src_list"; apt-get update -q >/dev/null; echo "deb-src for bookworm could not be enabled" >&2; exit 1; }
  fi
  rm -rf "$work" && mkdir -p "$work"
  echo "==> kube: fetching Debian's kubernetes $ver source"
  (cd "$work" && apt-get source --download-only kubernetes >/dev/null 2>&1)
  (cd "$work" && dpkg-source -x --skip-patches kubernetes_*.dsc tree >/dev/null)
  rm -f "$work"/kubernetes_*
  # reflect2 1.0.1 (vendored) crashes under Go >= 1.18: use Debian's 1.0.2.
  rm -f "$tree"/vendor/github.com/modern-go/reflect2/*.go
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$tree/vendor/github.com/modern-go/reflect2/"
  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
  touch "$tree/.weft-prepared"
fi
what=""
for b in $(missing); do
  case "$b" in
    e2e.test) what="$what test/e2e/e2e.test" ;;
    agnhost|pause|e2e-repo|cluster-dns) ;;
    *) what="$what cmd/$b" ;;
  esac
done
if [ -n "$what" ]; then
  echo "==> kube: building$what (about 10 minutes cold on 2 cores, under a minute warm)"
  started=$(date +%s)
  (cd "$tree/.go/src/k8s.io/kubernetes" && GOPATH="$tree/.go" CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor make WHAT="${what# }" >"$out/build.log" 2>&1) || { tail -30 "$out/build.log"; exit 1; }
  for b in $make_bins; do
    if [ ! -x "$out/$b-$ver" ]; then
      cp "$tree/_output/bin/$b" "$out/.$b-$ver.new"
      mv "$out/.$b-$ver.new" "$out/$b-$ver"
      echo "==> kube: built $out/$b-$ver"
    fi
  done
  echo "==> kube: make took $(( $(date +%s) - started )) s"
fi
if [ ! -x "$out/agnhost-$ver" ]; then
  # GOPATH mode, as hack/lib/init.sh builds it (module mode with -mod=vendor
  # fails for this package); make above made the GOPATH.
  gopath="$tree/_output/local/go"
  [ -d "$gopath/src/k8s.io/kubernetes" ] || { mkdir -p "$gopath/src/k8s.io"; ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"; }
  echo "==> kube: building agnhost"
  (cd "$gopath/src/k8s.io/kubernetes" && GO111MODULE=off GOPATH="$gopath" CGO_ENABLED=0 GOPROXY=off \
     GOCACHE="$tree/_output/local/go/cache" go build -o "$out/.agnhost-$ver.new" ./test/images/agnhost) >>"$out/build.log" 2>&1 \
     || { tail -30 "$out/build.log"; exit 1; }
  mv "$out/.agnhost-$ver.new" "$out/agnhost-$ver"
  echo "==> kube: built $out/agnhost-$ver"
fi
if [ ! -x "$dns_bin" ]; then
  # Inside the tree, so that its vendored client-go and miekg/dns apply.
  gopath="$tree/_output/local/go"
  mkdir -p "$tree/test/weft-cluster-dns"
  cp "$dns_src" "$tree/test/weft-cluster-dns/main.go"
  echo "==> kube: building cluster-dns (tests/kube/dns)"
  (cd "$gopath/src/k8s.io/kubernetes" && GO111MODULE=off GOPATH="$gopath" CGO_ENABLED=0 GOPROXY=off \
     GOCACHE="$tree/_output/local/go/cache" go build -o "$dns_bin.new" ./test/weft-cluster-dns) >>"$out/build.log" 2>&1 \
     || { tail -30 "$out/build.log"; exit 1; }
  for old in "$out"/cluster-dns-*; do [ "$old" = "$dns_bin.new" ] || rm -f "$old"; done
  mv "$dns_bin.new" "$dns_bin"
  echo "==> kube: built $dns_bin"
fi
if [ ! -x "$out/pause-$ver" ]; then
  gcc -static -O2 -DVERSION="weft-$ver" -o "$out/.pause-$ver.new" "$tree/build/pause/linux/pause.c"
  mv "$out/.pause-$ver.new" "$out/pause-$ver"
  echo "==> kube: built $out/pause-$ver"
fi
if [ ! -d "$out/e2e-repo-$ver" ]; then
  # What e2e.test reads from --repo-root: its manifests and the conformance list.
  # And the agnhost image's porter TLS pair (cargo xtask's image build adds it).
  rm -rf "$out/.e2e-repo.new" && mkdir -p "$out/.e2e-repo.new/test/e2e" "$out/.e2e-repo.new/test/conformance" "$out/.e2e-repo.new/test/images/agnhost"
  cp -a "$tree/test/e2e/testing-manifests" "$out/.e2e-repo.new/test/e2e/"
  cp -a "$tree/test/conformance/testdata" "$out/.e2e-repo.new/test/conformance/"
  cp -a "$tree/test/images/agnhost/porter" "$out/.e2e-repo.new/test/images/agnhost/"
  mv "$out/.e2e-repo.new" "$out/e2e-repo-$ver"
fi
echo "==> kube: Kubernetes $ver components cached in $out"
