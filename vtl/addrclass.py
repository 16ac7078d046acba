"""Destination classes a guest may not reach: the address policy behind egress checks.

Theory of operation. A service that stands in for the guest's TCP (``pep``,
``socks``) opens host connections to destinations the *guest* chose. Some of
them lead back into the host itself or to places only the host should talk
to; by default these are refused, for IPv4 and IPv6 alike:

==============  =========================  ===================================
class           IPv4                       IPv6
==============  =========================  ===================================
unspecified     0.0.0.0/8                  ::/128
loopback        127.0.0.0/8                ::1/128
link-local      169.254.0.0/16             fe80::/10
multicast       224.0.0.0/4                ff00::/8
reserved        240.0.0.0/4 (class E)      —
broadcast       255.255.255.255/32         —
own address     the bridge host's own addresses (passed in, see ``with_own``)
==============  =========================  ===================================

IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
IPv4-compatible ``::a.b.c.d``, SIIT ``::ffff:0:a.b.c.d`` and the NAT64
well-known prefix ``64:ff9b::a.b.c.d``) are judged as the IPv4 address they
carry, so ``::ffff:127.0.0.1`` is loopback and ``bridge.deny = ["10.0.0.0/8"]``
also denies ``::ffff:10.1.2.3``. Host strings are read the way the C library
reads them (``inet_aton``): ``127.1``, ``0x7f000001`` and ``2130706433`` are
127.0.0.1, not names.

An operator widens the policy with ``deny`` prefixes and narrows it with
``allow`` prefixes. The longest matching prefix decides; at equal length an
operator's entry beats a default class or an own address (so ``allow =
["127.0.0.0/8"]`` opens the loopback), and the same prefix in both lists is a
config error (:func:`conflicts`). An own address is a host prefix (/32, /128):
only an ``allow`` of that very address opens it.

Lookups are O(number of distinct prefix lengths) with one dict probe each;
an :class:`AddressPolicy` is immutable: :meth:`AddressPolicy.with_own` builds a
new one, so a reader never sees a half-updated table.

Not here: reading the host's addresses (``vtl.bridge.egress`` does that, from
the kernel), and names: a name is judged only when it is ``localhost`` or
ends in ``.localhost`` (RFC 6761); what a name resolves to is the resolver's
business (a SOCKS proxy must refuse private destinations itself).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CLASSES: tuple[tuple[str, str], ...] = (
    ("unspecified", "0.0.0.0/8"),
    ("loopback", "127.0.0.0/8"),
    ("link-local", "169.254.0.0/16"),
    ("multicast", "224.0.0.0/4"),
    ("reserved", "240.0.0.0/4"),
    ("broadcast", "255.255.255.255/32"),
    ("unspecified", "::/128"),
    ("loopback", "::1/128"),
    ("link-local", "fe80::/10"),
    ("multicast", "ff00::/8"),
)
_DEFAULT_NETS = tuple((c, ipaddress.ip_network(p)) for c, p in DEFAULT_CLASSES)
OWN = "own address"
PORT_ZERO = "port 0"
LOCALHOST = "localhost name"

_V4_MAPPED = int(ipaddress.IPv6Address("::ffff:0:0")) >> 32  # ::ffff:0:0/96
_V4_SIIT = int(ipaddress.IPv6Address("::ffff:0:0:0")) >> 32  # ::ffff:0:0:0/96
_V4_NAT64 = int(ipaddress.IPv6Address("64:ff9b::")) >> 32  # 64:ff9b::/96
_EMBEDDING = frozenset({0, _V4_MAPPED, _V4_SIIT, _V4_NAT64})  # 0: IPv4-compatible ::/96


def parse_prefix(text: str) -> Prefix:
    """A prefix from config: ``10.0.0.0/8``, ``fd00::/8`` or a bare address (a host
    prefix). ValueError with the reason when it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an IP prefix (give a string such as '10.0.0.0/8')")
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP prefix") from None
    raise ValueError(f"{text!r} has host bits set (did you mean {loose}?)")


def _legacy_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """What ``inet_aton`` makes of ``text``: 1 to 4 parts, each decimal, octal (leading
    0) or hex (0x); the last part fills the remaining bytes; anything after the first
    white space is ignored (as glibc does). None when it is not an address."""
    text = text.split(None, 1)[0] if text and not text[0].isspace() else ""
    parts = text.split(".")
    if not text or len(parts) > 4:
        return None
    values = []
    for part in parts:
        base = 10
        if part[:2] in ("0x", "0X"):
            part, base = part[2:], 16
        elif len(part) > 1 and part[0] == "0":
            part, base = part[1:], 8
        if not part or not part.isascii() or not part.isalnum():
            return None
        try:
            values.append(int(part, base))
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    n = last
    for i, v in enumerate(head):
        n |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(n)


def literal(host: str) -> Address | None:
    """The address ``host`` spells (``[v6]`` brackets, a scope id and the legacy IPv4
    forms accepted), or None when ``host`` is a name."""
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    return _legacy_ipv4(h) if ":" not in h else None


def unwrap(addr: Address) -> Address:
    """The IPv4 address an IPv6 address carries (mapped, compatible, SIIT, NAT64
    well-known prefix), else ``addr`` itself. ``::`` and ``::1`` stay as they are."""
    if addr.version == 6:
        n = int(addr)
        if n >> 32 in _EMBEDDING and n > 1:
            return ipaddress.IPv4Address(n & 0xFFFFFFFF)
    return addr


def is_localhost_name(name: str) -> bool:
    """``localhost`` and names under it (RFC 6761 6.3), any case, trailing dot or not."""
    n = name.rstrip(".").lower()
    return n == "localhost" or n.endswith(".localhost")


@dataclass(frozen=True, slots=True)
class _Entry:
    allow: bool
    label: str
    rank: int  # at equal prefix: 0 default class, 1 own address, 2 operator


class AddressPolicy:
    """Which destination addresses are refused: the default classes, the host's own
    addresses and an operator's ``deny``/``allow`` prefixes. Immutable."""

    __slots__ = ("deny", "allow", "own", "_tables")

    def __init__(self, deny: Iterable[Prefix | str] = (), allow: Iterable[Prefix | str] = (),
                 own: Iterable[Prefix | Address | str] = ()):
        self.deny = tuple(_prefix(p) for p in deny)
        self.allow = tuple(_prefix(p) for p in allow)
        self.own = tuple(sorted({_prefix(p) for p in own}, key=_sort_key))
        entries: list[tuple[Prefix, _Entry]] = []
        entries += [(net, _Entry(False, c, 0)) for c, net in _DEFAULT_NETS]
        entries += [(p, _Entry(False, _own_label(p), 1)) for p in self.own]
        entries += [(p, _Entry(False, f"bridge.deny {p}", 2)) for p in self.deny]
        entries += [(p, _Entry(True, f"bridge.allow {p}", 2)) for p in self.allow]
        tables: dict[int, tuple[tuple[int, ...], dict[tuple[int, int], _Entry]]] = {}
        for version, bits in ((4, 32), (6, 128)):
            table: dict[tuple[int, int], _Entry] = {}
            for net, entry in entries:
                if net.version != version:
                    continue
                key = (net.prefixlen, int(net.network_address) >> (bits - net.prefixlen))
                old = table.get(key)
                # higher rank wins; at equal rank (operator) deny wins over allow
                if old is None or (entry.rank, not entry.allow) > (old.rank, not old.allow):
                    table[key] = entry
            lengths = tuple(sorted({plen for plen, _ in table}, reverse=True))
            tables[version] = (lengths, table)
        self._tables = tables

    def with_own(self, own: Iterable[Prefix | Address | str]) -> AddressPolicy:
        """The same policy with another set of own addresses (or prefixes)."""
        return AddressPolicy(self.deny, self.allow, own)

    def check(self, addr: Address | str) -> str | None:
        """Why ``addr`` is refused (its class, ``own address`` or the operator's
        ``bridge.deny PREFIX``), or None when it may be reached."""
        a = unwrap(ipaddress.ip_address(addr) if isinstance(addr, str) else addr)
        bits = 32 if a.version == 4 else 128
        n = int(a)
        lengths, table = self._tables[a.version]
        for plen in lengths:
            entry = table.get((plen, n >> (bits - plen)))
            if entry is not None:
                return None if entry.allow else entry.label
        return None

    def refusal(self, host: str, port: int) -> str | None:
        """Why a connection to ``host`` (a literal or a name) port ``port`` is refused,
        or None: port 0 (or out of range), a refused address, a localhost name."""
        if not isinstance(port, int) or not 0 < port < 65536:
            return PORT_ZERO if port == 0 else f"port {port!r}"
        addr = literal(host)
        if addr is not None:
            return self.check(addr)
        return LOCALHOST if is_localhost_name(host) else None

    def __repr__(self) -> str:
        return (f"AddressPolicy(deny={[str(p) for p in self.deny]}, "
                f"allow={[str(p) for p in self.allow]}, own={len(self.own)} prefixes)")


def _prefix(p: Prefix | Address | str) -> Prefix:
    if isinstance(p, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return p
    if isinstance(p, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ipaddress.ip_network(p)
    return parse_prefix(p)


def _own_label(p: Prefix) -> str:
    """An own prefix inside a default class (127.0.0.1/32) is named after the class."""
    for label, net in _DEFAULT_NETS:
        if net.version == p.version and p.subnet_of(net):  # type: ignore[arg-type]
            return label
    return OWN


def _sort_key(p: Prefix) -> tuple[int, int, int]:
    return (p.version, int(p.network_address), p.prefixlen)


def conflicts(deny: Iterable[Prefix], allow: Iterable[Prefix]) -> list[Prefix]:
    """Prefixes that are in both lists (a config error: which one did the operator mean?)."""
    denied = set(deny)
    return [p for p in allow if p in denied]


DEFAULT_POLICY = AddressPolicy()


def refusal(host: str, port: int, policy: AddressPolicy = DEFAULT_POLICY) -> str | None:
    """Why the guest may not reach ``host``:``port`` under ``policy`` (default: the
    default classes only), or None."""
    return policy.refusal(host, port)


__all__ = [
    "DEFAULT_CLASSES", "DEFAULT_POLICY", "LOCALHOST", "OWN", "PORT_ZERO", "Address",
    "AddressPolicy", "Prefix", "conflicts", "is_localhost_name", "literal", "parse_prefix",
    "refusal", "unwrap",
]
