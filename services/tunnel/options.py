"""The ``tunnel`` service's options, validated as a whole (every error names its key)."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from vtl.services.tunnel.peers import StaticPeers, parse_endpoint

from vtl import ServiceOptions

DEFAULT_GATEWAY_MAC = "02:76:74:6c:00:01"
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


class PeerEntry(BaseModel):
    """One row of ``peers``: a prefix behind a remote tunnel endpoint."""

    model_config = ConfigDict(extra="forbid")
    prefix: str = Field(description="IPv4 or IPv6 prefix behind the peer, e.g. 10.62.2.0/24")
    remote: str = Field(description="the peer's tunnel endpoint, ADDR or ADDR:PORT")
    mac: str | None = Field(None, pattern=_MAC.pattern,
                            description="inner destination MAC for this site (default: "
                                        "resolved through the tunnel)")


class TunnelOptions(ServiceOptions):
    """Options of the ``tunnel`` service."""

    local: str = Field(description="this site's tunnel endpoint, ADDR or ADDR:PORT "
                                   "(UDP 4789 by default); must be an address of this host")
    vni: int = Field(ge=0, le=0xFFFFFF, description="VXLAN network identifier")
    gateway: list[str] = Field(min_length=1, description="this subnet's gateway addresses")
    peers: list[PeerEntry] = Field(min_length=1, description="remote prefixes and the "
                                                             "endpoints they sit behind")
    answer_arp: bool = Field(False, description="answer ARP/ND for the gateway addresses "
                                                "(a site without a gateway)")
    gateway_mac: str | None = Field(None, pattern=_MAC.pattern,
                                    description="the gateway's MAC when answering for it "
                                                f"(default {DEFAULT_GATEWAY_MAC})")
    learn: bool = Field(True, description="learn remote MACs from the tunnel and resolve "
                                          "unknown ones through it (needed for a kernel "
                                          "vxlan peer)")
    learn_timeout_s: float = Field(300.0, gt=0, description="forget a learnt MAC after "
                                                            "this long unseen")
    max_neighbors: int = Field(4096, ge=1, le=1_000_000, description="remote MACs learnt "
                                                                     "at most")
    ttl_decrement: bool = Field(True, description="decrement the TTL / hop limit as the "
                                                  "bypassed router would")
    datapath: Literal["kernel", "socket"] = Field(
        "kernel", description="who encapsulates: the host kernel's vxlan device, which the "
                              "bridge creates (fast: GSO frames whole; needs nft), or a UDP "
                              "socket and the service itself")
    mtu: int | None = Field(None, ge=576, le=65000, description="tunnel MTU (largest inner "
                                                               "IP packet); default 1450, "
                                                               "1430 over IPv6")

    @field_validator("local")
    @classmethod
    def _local(cls, v: str) -> str:
        parse_endpoint(v, "local")
        return v

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: list[str]) -> list[str]:
        for i, g in enumerate(v):
            try:
                ipaddress.ip_address(g)
            except ValueError:
                raise ValueError(f"gateway[{i}]: {g!r} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TunnelOptions:
        table = StaticPeers([(p.prefix, p.remote, None) for p in self.peers])
        local = ipaddress.ip_address(parse_endpoint(self.local, "local")[0])
        for peer in table.peers():
            if ipaddress.ip_address(peer.remote[0]).version != local.version:
                raise ValueError(f"peers: remote {peer.name} is not of the family of local "
                                 f"{self.local}")
        have = {ipaddress.ip_address(g).version for g in self.gateway}
        for v in table.families() - have:
            raise ValueError(f"gateway: no IPv{v} address, needed for the IPv{v} peer prefixes "
                             "(ICMP errors come from it)")
        if self.datapath == "kernel":
            port = parse_endpoint(self.local, "local")[1]
            for peer in table.peers():
                if peer.remote[1] != port:
                    raise ValueError(f"peers: remote {peer.name}: the kernel datapath sends "
                                     f"to one UDP port, local's ({port}); use datapath = "
                                     '"socket" for peers on other ports')
        if self.mtu is not None and self.mtu < 1280 and 6 in table.families():
            raise ValueError("mtu: IPv6 needs at least 1280")
        return self
