#!/bin/bash
# Runs weft on another kernel in an emulated QEMU guest (TCG: correctness,
# never speed) and checks it: `cargo xtask vm-check` calls this after a
# release build. WEFT_VM_KERNEL picks the kernel:
#   debian-6.1   Debian's 6.1 LTS cloud kernel (the default; KERNEL_PKG to
#                pick another Debian linux-image package), from apt;
#   ubuntu-5.15  Ubuntu 22.04's 5.15 generic kernel (the newest in
#                jammy-updates), from $UBUNTU_MIRROR (archive.ubuntu.com).
# Needs qemu-system-x86 and cpio (installed if missing), and curl and xz for
# Ubuntu's. Everything is cached under $WEFT_CACHE_DIR/vm. Exits 3 when the
# kernel cannot be downloaded (nothing about weft was checked).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
weft=${WEFT_BIN:-$here/../../target/release/weft}
cache=${WEFT_CACHE_DIR:-/var/cache/weft}/vm
kernel=${WEFT_VM_KERNEL:-debian-6.1}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v curl >/dev/null || need+=(curl)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> vm-check: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$cache"
unreachable() { echo "==> vm-check: could not download $1 (network or mirror down?); nothing was checked on $kernel" >&2; exit 3; }
case $kernel in
debian-6.1)
  pkg=${KERNEL_PKG:-$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/ {print $2; exit}')}
  if [ ! -d "$cache/$pkg" ]; then
    echo "==> vm-check: fetching $pkg"
    (cd "$cache" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x "$pkg"_*.deb "$pkg.tmp" && mv "$pkg.tmp" "$pkg" && rm -f "$pkg"_*.deb) || unreachable "$pkg"
  fi
  ;;
ubuntu-5.15)
  # The kernel image and the modules package (veth, bridge, sch_ingress and
  # cls_bpf are there, not in -extra), unpacked together. A cached one is
  # used as it is: no network needed once fetched.
  pkg=$(cd "$cache" && ls -d ubuntu-linux-5.15.0-*-generic 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$pkg" ]; then
    mirror=${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
    index=$(curl -fsS --retry 3 "$mirror/dists/jammy-updates/main/binary-amd64/Packages.xz" | xz -dc) || unreachable "the jammy-updates package index"
    ver=$(sed -n 's/^Package: linux-image-unsigned-\(5\.15\.0-[0-9]*-generic\)$/\1/p' <<<"$index" | sort -V | tail -1)
    [ -n "$ver" ] || unreachable "a linux-image-unsigned-5.15.0-*-generic entry"
    pkg=ubuntu-linux-$ver
    echo "==> vm-check: fetching Ubuntu's linux $ver"
    rm -rf "$cache/$pkg.tmp"
    for p in linux-image-unsigned-$ver linux-modules-$ver; do
      file=$(awk -v RS= -v p="Package: $p" 'index($0, p "\n") == 1' <<<"$index" | sed -n 's/^Filename: //p')
      [ -n "$file" ] || unreachable "$p (not in the index)"
      curl -fsS --retry 3 -o "$cache/$p.deb" "$mirror/$file" || unreachable "$p"
      dpkg-deb -x "$cache/$p.deb" "$cache/$pkg.tmp"
      rm -f "$cache/$p.deb"
    done
    mv "$cache/$pkg.tmp" "$cache/$pkg"
  fi
  ;;
*)
  echo "WEFT_VM_KERNEL=$kernel: expected debian-6.1 or ubuntu-5.15" >&2
  exit 2
  ;;
esac
kdir=$cache/$pkg
kver=$(ls "$kdir/lib/modules")
work=$(mktemp -d /tmp/weft-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
r=$work/root
mkdir -p $r/{bin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,mods}
cp /usr/bin/busybox $r/bin/
for a in sh ln mount mkdir cat echo sleep poweroff insmod ping grep seq sed kill awk tr readlink basename; do ln -sf busybox $r/bin/$a; done
copy() { # binary destination: with the libraries it links
  cp "$1" "$r$2"
  for l in $(ldd "$1" | grep -o '/[^ ]*'); do mkdir -p "$r$(dirname "$l")"; cp -L "$l" "$r$l"; done
}
if command -v strip >/dev/null; then strip -o "$work/weft" "$weft"; weft=$work/weft; fi  # a debug build is ~170 MB
copy /usr/sbin/ip /usr/sbin/ip; copy /usr/sbin/tc /usr/sbin/tc; copy /usr/sbin/ethtool /usr/sbin/ethtool
copy /usr/bin/nsenter /usr/bin/nsenter; copy /usr/bin/iperf3 /usr/bin/iperf3; copy "$weft" /usr/bin/weft
# In load order. What a kernel has built in (virtio and virtio_pci on
# Ubuntu's) is not there as a file and is left out.
for m in drivers/net/veth net/llc/llc net/802/stp net/bridge/bridge net/802/garp net/802/mrp net/8021q/8021q net/sched/sch_ingress net/sched/sch_tbf net/sched/cls_bpf net/ipv4/udp_tunnel net/ipv6/ip6_udp_tunnel drivers/net/vxlan/vxlan \
  drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci \
  net/core/failover drivers/net/net_failover drivers/net/virtio_net; do
  f=$kdir/lib/modules/$kver/kernel/$m.ko
  [ -f "$f" ] || continue
  cp "$f" $r/mods/
  basename "$m" >> $r/mods/order
done
install -m 755 "$here/guest-init.sh" $r/init
(cd $r && find . | cpio -o -H newc 2>/dev/null | gzip -1 > $work/initrd.gz)
fail=0
# tc, xdp: the nodes' underlay is a veth pair, the decap mode forced.
# nic: each node's underlay is a virtio-net NIC, the two wired to each other
# through a QEMU hub (no host network is involved), and the agents run with
# the default `--decap auto`, which must pick native (driver) XDP there, as on
# a cloud VM's NIC; then both agents restart with `--decap tc`, where the
# driver's GRO merges VXLAN through weft_gro before the decap; last, with
# `auto` on a 9000-byte MTU, where the driver refuses native XDP and `auto`
# must fall back to TC, and on a VLAN of each NIC.
for mode in tc xdp nic; do
  case $mode in
    nic) nics=(-netdev hubport,id=u1,hubid=0 -device virtio-net-pci,netdev=u1
               -netdev hubport,id=u2,hubid=0 -device virtio-net-pci,netdev=u2)
         decap=xdp; label="virtio-net NICs, --decap auto" ;;
    *) nics=(); decap=$mode; label="veth underlay, --decap $mode" ;;
  esac
  echo "==> vm-check: kernel $kver, $label (emulated; about a minute)"
  timeout 600 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 1536 -nographic -no-reboot \
    -kernel "$kdir/boot/vmlinuz-$kver" -initrd $work/initrd.gz -nic none "${nics[@]}" \
    -append "console=ttyS0 quiet panic=-1 weftmode=$mode" -serial file:$work/serial-$mode.log \
    -display none -monitor none >/dev/null 2>&1 || true
  out=$(grep -a '^GUEST' $work/serial-$mode.log | tr -d '\r' || true)
  echo "$out" | sed 's/^GUEST /    /'
  check() { echo "$out" | grep -Eq "$1" || { echo "    FAIL: expected /$1/"; fail=1; }; }
  if [ $mode = nic ]; then
    check "^GUEST underlay: u1 virtio_net, u2 virtio_net"
    check "node-1: .*dataplane attached decap=xdp \\(Driver\\)"
    check "node-2: .*dataplane attached decap=xdp \\(Driver\\)"
  else
    check "node-1: .*dataplane attached decap=$mode"
    check "node-2: .*dataplane attached decap=$mode"
  fi
  check "^GUEST ping ok"
  check "^GUEST iperf3 .*receiver"
  check "^GUEST ping6 ok"
  check "^GUEST ipv6 iperf3 .*receiver"
  # Before 6.0 TC decap delivers IPv6 through the pod veth's egress, and the
  # pod's replies take the stack (docs/DATAPLANE.md, "IPv6 pods").
  case $kver/$mode in
    5.15.*/tc) check "^GUEST ipv6 to_stack on node-2 \\+[1-9][0-9]*$" ;;
    *) check "^GUEST ipv6 to_stack on node-2 \\+0$" ;;
  esac
  check "^GUEST decap: $decap"
  check "^GUEST dropped: +malformed=0 unknown_vtep=0 wrong_vni=0 no_route=0 mtu=0 helper_failed=0 fib_lookup_failed=0 inner_not_ip=0"
  check "node-2: .*dataplane attached .*pods=1"
  check "^GUEST ping after restart ok"
  check "^GUEST pod veth filters: ingress 1, egress 1"
  case $kver in
    5.15.*) check "^GUEST weft_gro: 0, unsupported logged 1"; check "^GUEST vxlan gro: none" ;;
    *) check "^GUEST weft_gro: 1, unsupported logged 0"; check "^GUEST vxlan gro: weft_gro holds udp/8472" ;;
  esac
  [ $mode = tc ] && repairs=4 || repairs=3
  if [ $mode = nic ]; then
    check "^GUEST nic xdp: decap_redirect [1-9][0-9]*, checksum errors 0"
    for n in 1 2; do
      check "node-$n: tc: .*dataplane attached decap=tc \\(underlay driver \"virtio_net\"\\)"
      check "node-$n: jumbo: .*dataplane attached decap=tc \\(underlay driver \"virtio_net\"\\)"
      check "node-$n: vlan: .*dataplane attached decap=tc \\(underlay driver \"802.1Q VLAN Support\"\\)"
    done
    check "^GUEST nic tc: ping ok, iperf3 .*receiver"
    check "^GUEST nic tc: decap_peer [1-9][0-9]*, dropped 0, checksum errors 0"
    case $kver in
      # No weft_gro there: as `weft status` says, the decap sees every frame.
      5.15.*) check "^GUEST nic tc: GRO merged no " ;;
      *) check "^GUEST nic tc: GRO merged [0-9]+ frames per decap" ;;
    esac
    check "^GUEST nic jumbo: pod mtu 8950, ping of 8950-byte packets ok, iperf3 .*receiver"
    check "^GUEST nic jumbo: dropped 0 0, checksum errors 0, no native XDP logged 1 1"
    check "^GUEST nic vlan: ping ok, iperf3 .*receiver"
    check "^GUEST nic vlan: decap_peer \\+[1-9][0-9]*, frames on v2 \\+[1-9][0-9]*, dropped 0 0, checksum errors 0"
  fi
  check "^GUEST shaped pod: flagged 2, ping ok, to_stack \+6, 50 Mbit/s limit held; unshaped: flagged 0, ping ok, to_stack \+0"
  check "^GUEST after clsact removed: decap 1, host 1, pod 1 1, pod ping ok, node ping ok, repairs logged $repairs"
  check "^GUEST after down: tc filters on u2 0, xdp 0, pod veth 0 0"
  check "^GUEST after down: weft_gro 0$"
  check "^GUEST after down, a new agent: restored, ping ok, pod veth filters 1 1"
  check "^GUEST done"
done
[ $fail = 0 ] && echo "==> vm-check: ok on $kver" || { echo "==> vm-check: FAILED on $kver"; exit 1; }
