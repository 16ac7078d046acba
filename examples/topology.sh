#!/usr/bin/env bash
# Build (or remove) the namespaces the example configs expect, to try VTL by hand:
#
#   [vtlex-vm]  vtlex-tap (made by `vtl run`) 10.77.0.1 --- VTL --- vtlex-up ~ eth0 [vtlex-peer] 10.77.0.2
#
#   sudo examples/topology.sh up      # then: sudo vtl run examples/configs/empty.toml
#   sudo ip netns exec vtlex-vm ping 10.77.0.2
#   sudo examples/topology.sh down
#
# The guest address is set on the TAP once `vtl run` has created it: `topology.sh guest-ip`.
set -euo pipefail
P=${VTLEX_PREFIX:-vtlex}
case "${1:-}" in
  up)
    ip netns add "$P-vm"
    ip netns add "$P-peer"
    ip -n "$P-vm" link set lo up
    ip -n "$P-peer" link set lo up
    ip link add "$P-up" type veth peer name eth0 netns "$P-peer"
    sysctl -qw "net.ipv6.conf.$P-up.disable_ipv6=1"
    ip link set "$P-up" up
    ip -n "$P-peer" addr add 10.77.0.2/24 dev eth0
    ip -n "$P-peer" link set eth0 up
    echo "ready: run 'vtl run examples/configs/empty.toml', then '$0 guest-ip'"
    ;;
  guest-ip)
    ip -n "$P-vm" addr replace 10.77.0.1/24 dev "$P-tap"
    ip -n "$P-vm" link set "$P-tap" up
    ;;
  down)
    ip link del "$P-up" 2>/dev/null || true
    ip netns del "$P-vm" 2>/dev/null || true
    ip netns del "$P-peer" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 up|guest-ip|down" >&2
    exit 2
    ;;
esac
