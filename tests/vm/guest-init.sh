#!/bin/sh
# /init of the guest `tests/vm/run.sh` boots: two weft nodes (network
# namespaces joined by a veth pair, 198.18.0.0/24) with one pod each, on the
# guest's own kernel. Prints GUEST lines for the runner to check, then powers
# off. The mode comes from the kernel command line (weftmode=tc|xdp|nic):
# tc and xdp force that decap on a veth underlay; nic puts each node on one
# of the guest's two virtio-net NICs (wired to each other by the runner) with
# the default `--decap auto`, then checks `--decap tc` there too, and `auto`
# again on a jumbo MTU and on a VLAN. The nodes are dual-stack: the pods
# also talk IPv6 (2001:2:0:N::/64) in the same IPv4 tunnel.
# The guest has no iptables: masquerading is off (--ip-masq=false).
# Busybox's sh prefers its own applets: host binaries are called by path.
export PATH=/usr/sbin:/usr/bin:/bin
IP=/usr/sbin/ip; NS=/usr/bin/nsenter; WEFT=/usr/bin/weft
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /run; mount -t tmpfs tmp /tmp; mkdir -p /bpf; mount -t bpf bpf /bpf
for m in $(cat /mods/order); do insmod /mods/$m.ko; done
echo "GUEST kernel $(cat /proc/sys/kernel/osrelease)"
mkdir -p /run/netns /var; ln -s /run /var/run
for n in n1 n2 p1 p2; do $IP netns add $n; done
MODE=$(sed -n 's/.*weftmode=\([a-z]*\).*/\1/p' /proc/cmdline)
DECAP=$MODE
if [ "$MODE" = nic ]; then
  DECAP=auto
  # The NICs, in PCI order, become node-1's and node-2's underlay.
  NICS=$(for d in /sys/class/net/*; do [ "$(basename "$(readlink "$d/device/driver" 2>/dev/null)")" = virtio_net ] && basename "$d"; done)
  i=0
  for d in $NICS; do
    i=$((i + 1)); [ $i -le 2 ] || break
    $IP link set "$d" netns n$i
    $NS --net=/run/netns/n$i $IP link set "$d" name u$i
  done
  drv() { $NS --net=/run/netns/n$1 /usr/sbin/ethtool -i u$1 2>/dev/null | sed -n 's/^driver: //p'; }
  echo "GUEST underlay: u1 $(drv 1), u2 $(drv 2)"
else
  $IP link add u1 netns n1 type veth peer name u2 netns n2
fi
for i in 1 2; do
  $NS --net=/run/netns/n$i $IP addr add 198.18.0.$i/24 dev u$i
  $NS --net=/run/netns/n$i $IP link set u$i up
  $NS --net=/run/netns/n$i $IP link set lo up
done
if [ "$MODE" = xdp ]; then
  # An XDP redirect loses the sender's checksum-offload state: checksum in
  # software, as a NIC would on the wire (docs/DATAPLANE.md).
  for i in 1 2; do $NS --net=/run/netns/n$i /usr/sbin/ethtool -K u$i tx off >/dev/null; done
fi
cat > /tmp/nodes.toml <<T
[[node]]
name = "node-1"
underlay_ip = "198.18.0.1"
pod_cidrs = ["198.19.1.0/24", "2001:2:0:1::/64"]
[[node]]
name = "node-2"
underlay_ip = "198.18.0.2"
pod_cidrs = ["198.19.2.0/24", "2001:2:0:2::/64"]
T
UND=u  # the underlay is $UND1 on node-1, $UND2 on node-2
agent() { # node-index log
  $NS --net=/run/netns/n$1 $WEFT agent --node-name node-$1 --iface $UND$1 --cluster-cidr 198.19.0.0/16 \
    --cluster-cidr6 2001:2::/48 --nodes-file /tmp/nodes.toml --bpffs-dir /bpf/n$1 --run-dir /tmp/run$1 --decap $DECAP \
    --metrics-addr 127.0.0.1:980$1 --ip-masq=false > $2 2>&1 &
  echo $! > $2.pid
  for t in $(seq 1 120); do grep -q "ready run_dir=" $2 && break; sleep 0.5; done
  grep -E "dataplane attached|ERROR" $2 | sed "s/^/GUEST node-$1: /"
}
agent 1 /tmp/a1.log; agent 2 /tmp/a2.log
for i in 1 2; do
  $NS --net=/run/netns/n$i $WEFT endpoint add --netns /run/netns/p$i --id pod$i --ip 198.19.$i.10 \
    --ip6 2001:2:0:$i::10 --run-dir /tmp/run$i > /dev/null 2>&1 || echo "GUEST endpoint add FAILED on node-$i"
done
$NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && echo "GUEST ping ok" || echo "GUEST ping FAILED"
iperf() { # client-netns server-netns server-ip seconds: "iperf3 <its receiver line>" or "iperf3 FAILED"
  $NS --net=/run/netns/$2 /usr/bin/iperf3 -s -1 -B $3 > /dev/null 2>&1 &
  sleep 1
  $NS --net=/run/netns/$1 /usr/bin/iperf3 -c $3 -t $4 > /tmp/iperf.log 2>&1 \
    && echo "iperf3 $(grep receiver /tmp/iperf.log)" || echo "iperf3 FAILED"
}
echo "GUEST $(iperf p1 p2 198.19.2.10 3)"
# A counter from node-N's `weft status`; the sum of its drop counters; a
# pod's TCP checksum errors (what a frame whose checksum state the decap got
# wrong would become); frames a device of node-N received.
counter() { $NS --net=/run/netns/n$1 $WEFT status --bpffs-dir /bpf/n$1 --run-dir /tmp/run$1 | sed -n "s/.* $2=\([0-9]*\).*/\1/p"; }
drops() { $NS --net=/run/netns/n$1 $WEFT status --bpffs-dir /bpf/n$1 --run-dir /tmp/run$1 | grep '^dropped' | grep -o '=[0-9]*' | tr -d = | awk '{s += $1} END {print s + 0}'; }
csumerr() { $NS --net=/run/netns/$1 awk '/^Tcp:/ {if (!h) {split($0, k); h = 1} else {split($0, v); for (i in k) if (k[i] == "InCsumErrors") print v[i]}}' /proc/net/snmp; }
rxframes() { $NS --net=/run/netns/n$1 $IP -s link show $2 | awk 'r {print $2; exit} /RX:/ {r = 1}'; }
# IPv6 pods in the same tunnel (TC decap before 6.3 delivers them through
# the veth, as the kernel cannot retype a stripped skb there: none of that
# may pass for the stack's delivery, which would send the replies up the
# stack too).
T6=$(counter 2 to_stack)
$NS --net=/run/netns/p1 ping -6 -c 3 -W 2 2001:2:0:2::10 > /dev/null 2>&1 && echo "GUEST ping6 ok" || echo "GUEST ping6 FAILED"
echo "GUEST ipv6 $(iperf p1 p2 2001:2:0:2::10 2)"
echo "GUEST ipv6 to_stack on node-2 +$(($(counter 2 to_stack) - T6))"
$NS --net=/run/netns/n2 $WEFT status --bpffs-dir /bpf/n2 --run-dir /tmp/run2 | grep -E "^decap|^vxlan gro|forwarded|dropped" | sed 's/^/GUEST /'
if [ "$MODE" = nic ]; then
  echo "GUEST nic xdp: decap_redirect $(counter 2 decap_redirect), checksum errors $(csumerr p2)"
fi
# Restart node-2's agent: attachments stay; the new agent replaces their programs.
kill $(cat /tmp/a2.log.pid); sleep 1
agent 2 /tmp/a2b.log
$NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && echo "GUEST ping after restart ok" || echo "GUEST ping after restart FAILED"
# The pod's host-side veth carries weft's filter on both sides (ingress: from
# the pod; egress: what the stack delivers to it).
PV=$($NS --net=/run/netns/n2 $IP -o link show | sed -n 's/^[0-9]*: \(weft[0-9a-f]\{10\}\)[@:].*/\1/p')
podf() { $NS --net=/run/netns/n2 /usr/sbin/tc filter show dev "$PV" $1 | grep -c "bpf.* handle"; }
echo "GUEST pod veth filters: ingress $(podf ingress), egress $(podf egress)"
# weft_gro holds the VXLAN port for GRO where the kernel filters VNIs
# (5.18+); elsewhere the agent says why there is none.
G=$($NS --net=/run/netns/n1 $IP -d link show weft_gro 2>/dev/null | grep -c "vxlan external vnifilter")
echo "GUEST weft_gro: $G, unsupported logged $(grep -c 'cannot filter VXLAN VNIs' /tmp/a1.log)"
# A token bucket on the pod's veth (by hand here; the bandwidth plugin makes
# the same): the agent marks the pod shaped within its 5 s check, and what
# node-1's pod sends it is decapsulated to the stack (to_stack), which
# delivers it through the qdisc. Removed, the pod is back on the fast path.
# (The pod's two entries, IPv4 and IPv6, are flagged together.)
N2="$NS --net=/run/netns/n2"
st2() { $N2 $WEFT status --bpffs-dir /bpf/n2 --run-dir /tmp/run2; }
$N2 /usr/sbin/tc qdisc add dev "$PV" root tbf rate 50mbit burst 64kb latency 50ms
sleep 7
S=$(st2 | grep -c "shaped (through the stack)"); T0=$(counter 2 to_stack)
$NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && P="ping ok" || P="ping FAILED"
TS=$(($(counter 2 to_stack) - T0))
$NS --net=/run/netns/p2 /usr/bin/iperf3 -s -1 -B 198.19.2.10 > /dev/null 2>&1 &
sleep 1
R=$($NS --net=/run/netns/p1 /usr/bin/iperf3 -c 198.19.2.10 -t 2 -f m 2>/dev/null | sed -n 's/.* \([0-9][0-9]*\)[.0-9]* Mbits\/sec .*receiver.*/\1/p')
[ -n "$R" ] && [ "$R" -lt 75 ] && L="50 Mbit/s limit held" || L="50 Mbit/s limit NOT held (${R:-no} Mbit/s)"
T1=$(counter 2 to_stack)
$N2 /usr/sbin/tc qdisc del dev "$PV" root
sleep 12  # cleared after two checks without a qdisc
U=$(st2 | grep -c "shaped (through the stack)")
$NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && P2="ping ok" || P2="ping FAILED"
T2=$(counter 2 to_stack)
echo "GUEST shaped pod: flagged $S, $P, to_stack +$TS, $L; unshaped: flagged $U, $P2, to_stack +$((T2 - T1))"
# Something else removes the clsact qdiscs, and with them weft's netlink
# filters (decap on u2 in tc mode, weft0's egress): the agent puts them back
# within its 5 s check.
$N2 /usr/sbin/tc qdisc del dev u2 clsact 2>/dev/null
$N2 /usr/sbin/tc qdisc del dev weft0 clsact
$N2 /usr/sbin/tc qdisc del dev "$PV" clsact
sleep 7
if [ "$DECAP" != tc ]; then D=$($N2 $IP link show u2 | grep -c prog/xdp); else D=$($N2 /usr/sbin/tc filter show dev u2 ingress | grep -c "bpf.* handle"); fi
H=$($N2 /usr/sbin/tc filter show dev weft0 egress | grep -c "bpf.* handle")
$NS --net=/run/netns/p1 ping -c 2 -W 2 198.19.2.10 > /dev/null 2>&1 && P="pod ping ok" || P="pod ping FAILED"
$N2 ping -c 2 -W 2 198.19.1.10 > /dev/null 2>&1 && P="$P, node ping ok" || P="$P, node ping FAILED"
echo "GUEST after clsact removed: decap $D, host $H, pod $(podf ingress) $(podf egress), $P, repairs logged $(grep -c 'attached it again' /tmp/a2b.log)"
kill $(cat /tmp/a2b.log.pid); sleep 1
$N2 $WEFT down --bpffs-dir /bpf/n2 --run-dir /tmp/run2 > /dev/null 2>&1
echo "GUEST after down: weft_gro $($N2 $IP link show weft_gro 2>/dev/null | grep -c weft_gro)"
echo "GUEST after down: tc filters on u2 $($NS --net=/run/netns/n2 /usr/sbin/tc filter show dev u2 ingress | grep -c bpf), xdp $($NS --net=/run/netns/n2 $IP link show u2 | grep -c xdp), pod veth $(podf ingress) $(podf egress)"
# The pods outlive `weft down`: the next agent puts them back in the
# dataplane from their routes and neighbours (netlink filters here).
agent 2 /tmp/a2c.log
grep -q "restored them from the node's routes" /tmp/a2c.log && R=restored || R="not restored"
$NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && P="ping ok" || P="ping FAILED"
echo "GUEST after down, a new agent: $R, $P, pod veth filters $(podf ingress) $(podf egress)"
if [ "$MODE" = nic ]; then
  A1=/tmp/a1.log; A2=/tmp/a2c.log  # the agents running now
  agents() { # label: both agents stopped and started again, with $DECAP on $UND
    kill $(cat $A1.pid) $(cat $A2.pid); sleep 1
    A1=/tmp/a1$1.log; A2=/tmp/a2$1.log
    agent 1 $A1 | sed "s/^GUEST node-1: /GUEST node-1: $1: /"
    agent 2 $A2 | sed "s/^GUEST node-2: /GUEST node-2: $1: /"
  }
  # The same NICs with TC decap: the driver's GRO merges VXLAN through
  # weft_gro (5.18+) before weft_from_und sees it.
  DECAP=tc; agents tc
  $NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && P="ping ok" || P="ping FAILED"
  F0=$(rxframes 2 u2); D0=$(counter 2 decap_peer)
  P="$P, $(iperf p1 p2 198.19.2.10 3)"
  F=$(($(rxframes 2 u2) - F0)); D=$(($(counter 2 decap_peer) - D0))
  echo "GUEST nic tc: $P"
  echo "GUEST nic tc: decap_peer $D, dropped $(drops 2), checksum errors $(csumerr p2)"
  [ "$D" -gt 0 ] && [ $((F / D)) -ge 2 ] && G="$((F / D)) frames per decap" || G="no ($F frames, $D decaps)"
  echo "GUEST nic tc: GRO merged $G"
  # A jumbo underlay (AWS's is 9001): drivers refuse native XDP for frames
  # over about a page (virtio_net: "MTU too large to enable XDP"), so `auto`
  # must fall back to TC decap; pods made now get MTU 8950 and a frame of
  # that size crosses in VXLAN both ways.
  for i in 1 2; do $NS --net=/run/netns/n$i $IP link set u$i mtu 9000; done
  DECAP=auto; agents jumbo
  for i in 1 2; do
    $IP netns add q$i
    $NS --net=/run/netns/n$i $WEFT endpoint add --netns /run/netns/q$i --id jumbo$i --ip 198.19.$i.20 \
      --run-dir /tmp/run$i > /dev/null 2>&1 || echo "GUEST endpoint add FAILED for a jumbo pod on node-$i"
  done
  M=$($NS --net=/run/netns/q1 $IP link show eth0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')
  # 8922 bytes of ICMP payload: an 8950-byte IP packet, the pod's MTU.
  $NS --net=/run/netns/q1 ping -c 3 -W 2 -s $((M - 28)) 198.19.2.20 > /dev/null 2>&1 \
    && P="ping of $M-byte packets ok" || P="ping of $M-byte packets FAILED"
  echo "GUEST nic jumbo: pod mtu $M, $P, $(iperf q1 q2 198.19.2.20 2)"
  echo "GUEST nic jumbo: dropped $(drops 1) $(drops 2), checksum errors $(csumerr q2), no native XDP logged $(grep -c "no native XDP on the underlay" $A1) $(grep -c "no native XDP on the underlay" $A2)"
  grep -m 1 "no native XDP" $A1 | sed 's/^/GUEST nic jumbo: node-1: /'
  # An 802.1Q VLAN on each NIC as the underlay, as on many bare-metal
  # nodes, with `auto`: a VLAN device has no native XDP, so TC decap, and
  # VXLAN leaves and arrives tagged (VLAN 100, 198.18.1.0/24).
  for i in 1 2; do
    $NS --net=/run/netns/n$i $IP link set u$i mtu 1500
    $NS --net=/run/netns/n$i $IP link add link u$i name v$i type vlan id 100
    $NS --net=/run/netns/n$i $IP addr add 198.18.1.$i/24 dev v$i
    $NS --net=/run/netns/n$i $IP link set v$i up
  done
  sed -i 's/198[.]18[.]0[.]/198.18.1./' /tmp/nodes.toml
  UND=v; agents vlan
  F0=$(rxframes 2 v2); D0=$(counter 2 decap_peer)
  $NS --net=/run/netns/p1 ping -c 3 -W 2 198.19.2.10 > /dev/null 2>&1 && P="ping ok" || P="ping FAILED"
  echo "GUEST nic vlan: $P, $(iperf p1 p2 198.19.2.10 2)"
  echo "GUEST nic vlan: decap_peer +$(($(counter 2 decap_peer) - D0)), frames on v2 +$(($(rxframes 2 v2) - F0)), dropped $(drops 1) $(drops 2), checksum errors $(csumerr p2)"
fi
echo "GUEST done"
poweroff -f
