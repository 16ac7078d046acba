"""Frames a guest sends to speak as someone else (run inside the guest's namespace, as root).

Usage: ``fwspoof.py TAP GUEST_MAC GUEST_IP GUEST_IP6 PEER_IP MARKER``: sends, three
times each, a frame from another MAC, an IPv4 packet from another address, an IPv6
packet from another address, a gratuitous ARP claiming the peer's address and a
DHCP offer (a DHCP server's answer); the IP ones carry MARKER.
"""

from __future__ import annotations

import sys

from scapy.all import ARP, BOOTP, DHCP, IP, UDP, Ether, IPv6, Raw, sendp


def frames(gmac: str, gip: str, pip: str, marker: bytes) -> list[Ether]:
    bcast = "ff:ff:ff:ff:ff:ff"
    offer = DHCP(options=[("message-type", "offer"), "end"])
    return [
        Ether(src="02:66:66:66:66:66", dst=bcast) / IP(src=gip, dst=pip) / UDP(dport=9)
        / Raw(marker),
        Ether(src=gmac, dst=bcast) / IP(src="10.198.0.77", dst=pip) / UDP(dport=9)
        / Raw(marker),
        Ether(src=gmac, dst="33:33:00:00:00:01") / IPv6(src="fd00:198::77", dst="ff02::1")
        / UDP(dport=9) / Raw(marker),
        Ether(src=gmac, dst=bcast) / ARP(op=2, hwsrc=gmac, psrc=pip, hwdst=bcast, pdst=pip),
        Ether(src=gmac, dst=bcast) / IP(src=gip, dst="255.255.255.255")
        / UDP(sport=67, dport=68) / BOOTP(op=2, yiaddr="10.198.0.50") / offer,
    ]


def main() -> None:
    tap, gmac, gip, _gip6, pip, marker = sys.argv[1:7]
    for _ in range(3):
        sendp(frames(gmac, gip, pip, marker.encode()), iface=tap, verbose=False)


if __name__ == "__main__":
    main()
