"""A scripted SOCKS5 server, sans-IO, and a client driver: shared by the transport tests
and the ``socks`` service tests.

Imported as ``transports_socks5peer`` (registered by ``tests/bridge/transports/conftest.py``
and ``tests/services/conftest.py``, under a name that cannot clash with another folder's
helpers).

- :class:`Peer` parses exactly what a client must send (RFC 1928, RFC 1929, Tor's
  RESOLVE / RESOLVE_PTR) and asserts it byte by byte, so a wrong greeting, request or
  credential encoding fails at the peer, not at a real proxy. Its answers are
  configurable (any method choice, REP code, BND address, garbage).
- :class:`TorPeer` is that peer answering exactly as Tor's SocksPort does
  (``connection_ap_handshake_socks_resolved`` / ``..._socks_reply`` in tor's
  ``connection_edge.c``; ``socks-extensions.txt``; prop 304 extended errors), from the
  tables of a :class:`TorNet` that every stream of a test shares, and records each
  stream's credentials, command and target there (IsolateSOCKSAuth keys circuits on
  the credentials, so the record is what decides isolation).
- :func:`exchange` runs a client handshake (``start()`` / ``feed()``) against a peer
  the way the stream manager does: send what it says, read exactly ``want`` bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

from vtl.bridge.transports import TransportError
from vtl.bridge.transports.socks5 import Socks5Handshake

NO_AUTH, USERPASS, NONE_ACCEPTABLE = 0x00, 0x02, 0xFF
CONNECT, RESOLVE, RESOLVE_PTR = 0x01, 0xF0, 0xF1
COMMAND_NAMES = {CONNECT: "connect", RESOLVE: "resolve", RESOLVE_PTR: "resolve_ptr"}
# REP codes (RFC 1928 section 6; Tor's prop 304 for 0xF0..0xF7)
GENERAL_FAILURE, HOST_UNREACHABLE, CONNECTION_REFUSED = 0x01, 0x04, 0x05
ONION_DESC_NOT_FOUND, ONION_DESC_INVALID, ONION_INTRO_FAILED = 0xF0, 0xF1, 0xF2
ONION_REND_FAILED, ONION_MISSING_AUTH, ONION_BAD_AUTH = 0xF3, 0xF4, 0xF5
ONION_BAD_ADDRESS, ONION_INTRO_TIMEOUT = 0xF6, 0xF7


# -- a scripted SOCKS5 server, sans-IO -----------------------------------------------------


def encode_reply(rep: int, atyp: int, addr: str, port: int) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT (RFC 1928 section 6)."""
    if atyp == 3:
        raw = addr.encode("ascii")
        body = bytes([len(raw)]) + raw
    else:
        body = ipaddress.ip_address(addr).packed
        assert len(body) == (4 if atyp == 1 else 16)
    return bytes([5, rep, 0, atyp]) + body + struct.pack("!H", port)


class Peer:
    """A SOCKS5 server that parses exactly what a client must send and answers.

    ``auth``: ``"tor"`` picks username/password when offered, else no auth (Tor
    with IsolateSOCKSAuth); ``"none"`` only takes no auth; ``"required"`` only
    username/password. ``users`` (None: any) are the accepted credentials.
    CONNECT succeeds with ``bnd`` followed by ``after`` (application bytes in the
    same write), or fails with ``rep``. RESOLVE looks ``names`` up, RESOLVE_PTR
    ``ptrs``; a miss is REP 4, as Tor answers. ``*_reply`` replace an answer
    with raw bytes. ``log`` collects the credentials of every connection.
    """

    def __init__(self, *, auth: str = "tor", users: dict[bytes, bytes] | None = None,
                 bnd: tuple[int, str, int] = (1, "10.1.2.3", 4242), rep: int = 0,
                 names: dict[str, str] | None = None, ptrs: dict[str, str] | None = None,
                 after: bytes = b"", method_reply: bytes | None = None,
                 auth_reply: bytes | None = None, reply: bytes | None = None,
                 log: list | None = None):
        self.auth, self.users, self.bnd, self.rep = auth, users, bnd, rep
        self.names, self.ptrs, self.after = names or {}, ptrs or {}, after
        self.method_reply, self.auth_reply, self.reply = method_reply, auth_reply, reply
        self.log = log if log is not None else []
        self.offered: list[int] | None = None
        self.creds: tuple[bytes, bytes] | None = None
        self.request: tuple[int, int, str, int] | None = None
        self.request_bytes = b""
        self.app = bytearray()  # what the client sent after its request
        self._in = bytearray()
        self._out = bytearray()
        self._script = self.script()
        self._need: int | None = next(self._script)

    @property
    def finished(self) -> bool:
        return self._need is None

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the client; return what the server answers."""
        self._in += data
        while self._need is not None and len(self._in) >= self._need:
            chunk = bytes(self._in[:self._need])
            del self._in[:self._need]
            try:
                self._need = self._script.send(chunk)
            except StopIteration:
                self._need = None
        if self._need is None:
            self.app += self._in
            self._in.clear()
        out = bytes(self._out)
        self._out.clear()
        return out

    def script(self) -> Generator[int, bytes, None]:
        ver, nmethods = yield 2
        assert ver == 5, f"greeting version {ver}"
        assert nmethods >= 1
        methods = list((yield nmethods))
        assert len(set(methods)) == len(methods), "a method offered twice"
        self.offered = methods
        if self.method_reply is not None:
            self._out += self.method_reply
            return
        if self.auth == "none":
            chosen = NO_AUTH if NO_AUTH in methods else NONE_ACCEPTABLE
        elif self.auth == "required":
            chosen = USERPASS if USERPASS in methods else NONE_ACCEPTABLE
        else:
            chosen = USERPASS if USERPASS in methods else (
                NO_AUTH if NO_AUTH in methods else NONE_ACCEPTABLE)
        self._out += bytes([5, chosen])
        if chosen == NONE_ACCEPTABLE:
            return
        if chosen == USERPASS:  # RFC 1929
            ver, ulen = yield 2
            assert ver == 1, f"username/password version {ver}"
            assert ulen >= 1
            user = yield ulen
            (plen,) = yield 1
            assert plen >= 1
            password = yield plen
            self.creds = (user, password)
            self.log.append(self.creds)
            ok = self.users is None or self.users.get(user) == password
            self._out += self.auth_reply if self.auth_reply is not None else bytes(
                [1, 0 if ok else 1])
            if not ok or self.auth_reply is not None:
                return
        head = yield 4
        ver, cmd, rsv, atyp = head
        assert ver == 5 and rsv == 0, f"request head {head.hex()}"
        assert cmd in (CONNECT, RESOLVE, RESOLVE_PTR), f"command {cmd:#x}"
        if atyp == 1:
            raw = yield 4
            addr = str(ipaddress.ip_address(raw))
        elif atyp == 4:
            raw = yield 16
            addr = str(ipaddress.ip_address(raw))
        elif atyp == 3:
            (n,) = raw = yield 1
            assert n >= 1
            name = yield n
            raw += name
            addr = name.decode("ascii")
        else:
            raise AssertionError(f"address type {atyp}")
        pbytes = yield 2
        (port,) = struct.unpack("!H", pbytes)
        self.request = (cmd, atyp, addr, port)
        self.request_bytes = head + raw + pbytes
        self._out += self.answer(cmd, addr, port)

    def answer(self, cmd: int, addr: str, port: int) -> bytes:
        if self.reply is not None:
            return self.reply
        if self.rep:
            return encode_reply(self.rep, 1, "0.0.0.0", 0)
        if cmd == CONNECT:
            return encode_reply(0, *self.bnd) + self.after
        if cmd == RESOLVE:
            ip = self.names.get(addr)
            if ip is None:
                return encode_reply(4, 1, "0.0.0.0", 0)
            return encode_reply(0, 1 if ipaddress.ip_address(ip).version == 4 else 4, ip, 0)
        name = self.ptrs.get(addr)
        if name is None:
            return encode_reply(4, 1, "0.0.0.0", 0)
        return encode_reply(0, 3, name, 0)


# -- Tor's SocksPort ------------------------------------------------------------------------


@dataclass(frozen=True)
class TorStream:
    """One SOCKS request as Tor saw it: the credentials (IsolateSOCKSAuth's key; None
    when the client took no auth), the command, the target as sent, and the REP."""

    username: bytes | None
    password: bytes | None
    command: str  # "connect", "resolve" or "resolve_ptr"
    target: tuple[str, int]
    rep: int


@dataclass
class TorNet:
    """What a Tor client can reach, and what it was asked; shared by every :class:`TorPeer`.

    ``names``: what exits resolve a name to (one address or several, in the order the
    RESOLVED cell lists them); looked up case-insensitively, as DNS does. ``ptrs``:
    address literal -> name, for RESOLVE_PTR. ``connect_errors``: CONNECT target (name
    or literal, as sent) -> the REP Tor answers (every other CONNECT succeeds).
    ``ipv4_traffic``, ``ipv6_traffic``, ``prefer_ipv6``, ``extended_errors``: the
    SocksPort flags (``NoIPv4Traffic``, ``IPv6Traffic``, ``PreferIPv6``,
    ``ExtendedErrors``) that decide which resolved address a RESOLVE returns and whether
    onion-service failures keep their prop 304 codes (here PreferIPv6 is off unless a
    test sets it; Tor itself turns it on by default since 0.4.3). ``streams`` is the
    record.
    """

    names: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    ptrs: dict[str, str] = field(default_factory=dict)
    connect_errors: dict[str, int] = field(default_factory=dict)
    ipv4_traffic: bool = True
    ipv6_traffic: bool = True
    prefer_ipv6: bool = False
    extended_errors: bool = True
    streams: list[TorStream] = field(default_factory=list)

    def addresses(self, name: str) -> tuple[str, ...]:
        got = self.names.get(name.lower(), ())
        return (got,) if isinstance(got, str) else tuple(got)

    def seen(self, command: str | None = None) -> list[TorStream]:
        return [s for s in self.streams if command is None or s.command == command]


#: Tor's answer to a failed RESOLVE / RESOLVE_PTR: REP 4 and eight zero bytes (ATYP 0)
TOR_RESOLVE_FAILED = bytes([5, HOST_UNREACHABLE]) + bytes(8)


class TorPeer(Peer):
    """A Tor SocksPort (IsolateSOCKSAuth, the default): username/password when offered,
    any credentials accepted; replies byte for byte as tor writes them:

    - CONNECT: success is REP 0 with BND 0.0.0.0:0; a failure is its REP with the same
      zero IPv4 BND; onion-service codes 0xF0-0xF7 only with ``ExtendedErrors``, else
      REP 1 (general failure);
    - RESOLVE: an IP literal answers itself; a ``.onion`` name is refused (Tor never
      resolves those); a name gets the first IPv4 or first IPv6 address of its RESOLVED
      cell, by ``prefer_ipv6``, among the families ``ipv4_traffic``/``ipv6_traffic``
      allow (port 0); nothing usable is ``TOR_RESOLVE_FAILED``;
    - RESOLVE_PTR: only for an IP literal; the name (ATYP 3, port 0) or
      ``TOR_RESOLVE_FAILED``.
    """

    def __init__(self, net: TorNet):
        super().__init__(auth="tor")
        self.net = net

    def answer(self, cmd: int, addr: str, port: int) -> bytes:
        rep, wire = self._tor(cmd, addr, port)
        user, password = self.creds if self.creds is not None else (None, None)
        self.net.streams.append(TorStream(user, password, COMMAND_NAMES[cmd], (addr, port),
                                          rep))
        return wire

    def _tor(self, cmd: int, addr: str, port: int) -> tuple[int, bytes]:
        net = self.net
        literal = _literal(addr)
        if cmd == CONNECT:
            assert port != 0, "CONNECT to port 0"
            rep = net.connect_errors.get(addr, 0)
            if rep >= ONION_DESC_NOT_FOUND and not net.extended_errors:
                rep = GENERAL_FAILURE
            return rep, encode_reply(rep, 1, "0.0.0.0", 0)
        if cmd == RESOLVE_PTR:
            assert literal is not None, f"RESOLVE_PTR of {addr!r}, not an address"
            name = net.ptrs.get(str(literal))
            if name is None:
                return HOST_UNREACHABLE, TOR_RESOLVE_FAILED
            return 0, encode_reply(0, 3, name, 0)
        if literal is not None:
            found: Iterable[str] = (str(literal),)
        elif addr.lower().endswith(".onion"):
            found = ()
        else:
            found = net.addresses(addr)
        v4 = next((a for a in found if _literal(a).version == 4 and net.ipv4_traffic), None)
        v6 = next((a for a in found if _literal(a).version == 6 and net.ipv6_traffic), None)
        best = (v6 or v4) if net.prefer_ipv6 else (v4 or v6)
        if best is None:
            return HOST_UNREACHABLE, TOR_RESOLVE_FAILED
        return 0, encode_reply(0, 1 if _literal(best).version == 4 else 4, best, 0)


def _literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# -- running a client handshake against a peer ------------------------------------------------


@dataclass
class Outcome:
    reply: tuple[str, int] | None = None
    error: TransportError | None = None
    stalled: bool = False  # the handshake waits for bytes the peer does not owe
    wants: list[int] = field(default_factory=list)
    sent: bytes = b""
    leftover: bytes = b""  # peer bytes the handshake did not read
    hs: Socks5Handshake | None = None

    @property
    def result(self) -> tuple:
        if self.error is not None:
            return ("error", self.error.reason, self.error.message)
        return ("stalled",) if self.stalled else ("reply", self.reply)


def exchange(hs: Socks5Handshake, peer: Peer,
             sends: Callable[[bytes], list[bytes]] = lambda b: [b],
             reads: Callable[[], int] = lambda: 1 << 20) -> Outcome:
    """Run handshake ``hs`` against ``peer`` as the stream manager does: send what it
    says (cut by ``sends``), then read into a buffer until it holds exactly ``want``
    bytes, ``reads()`` bytes at most per recv, and feed those."""
    wire = bytearray()
    out = Outcome(hs=hs)
    try:
        step = hs.start()
        while True:
            out.sent += step.send
            for piece in sends(step.send):
                wire += peer.receive(piece)
            if step.want == 0:
                out.reply = hs.reply
                break
            assert step.want > 0
            out.wants.append(step.want)
            buf = b""
            while len(buf) < step.want:
                if not wire:
                    out.stalled = True
                    out.leftover = buf
                    return out
                n = min(reads(), step.want - len(buf), len(wire))
                assert n > 0
                buf += bytes(wire[:n])
                del wire[:n]
            step = hs.feed(buf)
    except TransportError as exc:
        out.error = exc
    out.leftover += bytes(wire)
    return out


__all__ = ["COMMAND_NAMES", "CONNECT", "NONE_ACCEPTABLE", "NO_AUTH", "Outcome", "Peer",
           "RESOLVE", "RESOLVE_PTR", "TOR_RESOLVE_FAILED", "TorNet", "TorPeer", "TorStream",
           "USERPASS", "encode_reply", "exchange"]
