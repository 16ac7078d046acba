"""Options of the ``socks`` service, and the proxy URL they carry.

Every check names the key and the problem, so that ``vtl check`` tells an
operator exactly what to fix (``services[0].proxy: ...``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from vtl import ServiceOptions
from vtl.packet.addr import mac_bytes, mac_str
from vtl.service import TcpCongestion

DNS_MODES = ("fake-ip", "tor-resolve", "tcp://ADDR:PORT")


@dataclass(frozen=True, slots=True)
class ProxyUrl:
    """``socks5://[user:pass@]host:port`` taken apart."""

    host: str  # an IP literal (no brackets) or a name
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_proxy_url(url: str) -> ProxyUrl:
    """Parse a SOCKS5 proxy URL; ValueError says what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a proxy URL ({exc}): give socks5://[user:pass@]host:port") from None
    if parts.scheme not in ("socks5", "socks5h"):
        raise ValueError(f"scheme {parts.scheme or '(none)'!r} is not supported: give "
                         "socks5://[user:pass@]host:port (names are always resolved by the "
                         "proxy, so socks5h means the same)")
    if not parts.hostname:
        raise ValueError("no proxy host: give socks5://[user:pass@]host:port")
    if port is None:
        raise ValueError("no proxy port: give socks5://[user:pass@]host:port (Tor: 9050)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path, query or fragment")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if (user is None) != (password is None) or user == "":
        raise ValueError("credentials need both a user and a password (user:pass@)")
    for what, v in (("user", user), ("password", password)):
        if v is not None and not 1 <= len(v.encode()) <= 255:
            raise ValueError(f"the {what} must be 1 to 255 bytes (RFC 1929)")
    return ProxyUrl(parts.hostname, port, user, password)


def parse_dns_mode(value: str) -> tuple[str, tuple[str, int] | None]:
    """``("fake-ip"|"tor-resolve"|"tcp", resolver)``; ValueError when not one of the modes."""
    if value in ("fake-ip", "tor-resolve"):
        return value, None
    if value.startswith("tcp://"):
        parts = urlsplit(value)
        try:
            port = parts.port or 53
            host = parts.hostname or ""
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: give tcp://ADDRESS:PORT with an IP address, e.g. "
                             "tcp://9.9.9.9:53 or tcp://[2620:fe::fe]:53") from None
        if parts.path not in ("", "/"):
            raise ValueError(f"{value!r}: no path after the port")
        return "tcp", (host, port)
    raise ValueError(f"{value!r} is not a DNS mode: give one of {', '.join(DNS_MODES)}")


def random_gateway_mac() -> str:
    """A random unicast, locally administered MAC (x2:, x6:, xA:, xE:)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return mac_str(bytes(b))


class SocksOptions(ServiceOptions):
    """Options of the ``socks`` service."""

    proxy: str = Field(description="socks5://[user:pass@]host:port of the SOCKS5 proxy "
                       "(Tor: socks5://127.0.0.1:9050)")
    dns: str = Field("fake-ip", description="how the VM's DNS is answered: fake-ip, "
                     "tor-resolve or tcp://ADDR:PORT (DNS over TCP through the proxy)")
    fake_ip_pool: str = Field("198.18.0.0/15", description="IPv4 addresses handed out "
                              "for names in fake-ip mode")
    fake_ip6_pool: str = Field("fd98:18::/64", description="IPv6 addresses handed out "
                               "for names in fake-ip mode")
    dns_ttl: int = Field(60, ge=1, le=86400, description="TTL of the answers VTL makes")
    dns_timeout_s: float = Field(5.0, gt=0, le=60,
                                 description="SERVFAIL when the upstream has not answered by then")
    gateway_mac: str = Field(default_factory=random_gateway_mac, description="the MAC every "
                             "ARP and neighbour solicitation is answered with (default: random, "
                             "locally administered)")
    reject: bool = Field(True, description="answer what is dropped with ICMP administratively "
                         "prohibited (false: drop silently)")
    isolate: bool = Field(False, description="per-VM SOCKS credentials, so that Tor "
                          "(IsolateSOCKSAuth) never shares a circuit between VMs")
    connect_timeout_s: float = Field(20.0, gt=0, le=300, description="give up on the proxy's "
                                     "answer to a CONNECT after this long (Tor needs a circuit)")
    buffer_bytes: int = Field(2 * 1024 * 1024, ge=16 * 1024, le=1 << 30,
                              description="memory per connection, both directions together")
    max_connections: int = Field(1024, ge=1, le=1_000_000,
                                 description="connections at once; more get RST")
    congestion: TcpCongestion = Field(None, description="congestion control of the "
                                      "connections to the proxy (TCP_CONGESTION: bbr, "
                                      "cubic, ...; default: the kernel's)")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str) -> str:
        parse_proxy_url(v)
        return v

    @field_validator("dns")
    @classmethod
    def _dns(cls, v: str) -> str:
        parse_dns_mode(v)
        return v

    @field_validator("fake_ip_pool", "fake_ip6_pool")
    @classmethod
    def _pool(cls, v: str, info: ValidationInfo) -> str:
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"not a network: {exc}") from None
        want = 6 if info.field_name == "fake_ip6_pool" else 4
        if net.version != want:
            raise ValueError(f"give an IPv{want} network, e.g. "
                             + ("198.18.0.0/15" if want == 4 else "fd98:18::/64"))
        if net.num_addresses < 4:
            raise ValueError("the pool needs at least 4 addresses")
        return v

    @field_validator("gateway_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        try:
            b = mac_bytes(v)
        except Exception as exc:  # noqa: BLE001 - any parse error is the same problem
            raise ValueError(f"not a MAC address: {exc}") from None
        if b[0] & 1 or b == bytes(6):
            raise ValueError("must be a unicast MAC (the first octet's low bit clear, not zero)")
        return mac_str(b)

    @model_validator(mode="after")
    def _isolation(self) -> SocksOptions:
        if self.isolate and parse_proxy_url(self.proxy).username is not None:
            raise ValueError("isolate = true makes per-VM credentials; remove user:pass@ from "
                             "proxy (Tor accepts any) or set isolate = false")
        return self

    @property
    def proxy_url(self) -> ProxyUrl:
        return parse_proxy_url(self.proxy)

    @property
    def dns_mode(self) -> tuple[str, tuple[str, int] | None]:
        return parse_dns_mode(self.dns)
