"""The ``socks5`` stream transport: a TCP connection through a SOCKS5 proxy (or Tor).

Theory of operation. ``StreamRequest(kind="socks5", host, port)`` connects a
non-blocking TCP socket to the *proxy* (:meth:`Socks5Transport.endpoint`; the
socket is set up as for ``tcp``: ``TCP_NODELAY``, kernel buffers), then runs
a sans-IO RFC 1928 exchange before the service sees ``StreamConnected``::

    METHOD  ──greeting──►  VER NMETHODS METHODS          want 2 (VER METHOD)
    AUTH    ──RFC 1929──►  VER ULEN UNAME PLEN PASSWD    want 2 (VER STATUS)
    REPLY   ──request──►   VER CMD RSV ATYP DST.ADDR DST.PORT
                           want 4 (VER REP RSV ATYP), then by ATYP: 4+2 / 16+2,
                           or for a name 1 (its length), then length+2
    DONE    (want 0; ``Handshake.reply`` = (BND.ADDR, BND.PORT))

Invariants: every step asks for exactly the bytes the proxy owes at that
point and never more, so application bytes that arrive right behind the reply
(in the same segment) are the stream's first ``StreamData``; the destination
is sent as the proxy must see it: an IPv4 or IPv6 literal as ATYP 1 or 4, any
other host as a name (ATYP 3), which is **never resolved here** (a local
lookup would leak the name to the local resolver: a DNS leak under Tor);
every failure message starts with ``SOCKS proxy HOST:PORT`` so that a log
line says which proxy failed and why.

Options (``StreamRequest.options``):

- ``proxy``: ``(host, port)`` of the proxy, required; ``host`` is an IPv4 or
  IPv6 literal (``"[::1]"`` brackets accepted) or a name, which the stream
  manager resolves (the proxy's own name only, never the destination's);
- ``username``, ``password``: RFC 1929 credentials, both or neither, each
  1..255 bytes of UTF-8. With them the greeting offers methods 0x00 and 0x02
  (Tor picks 0x02 and, with ``IsolateSOCKSAuth``, keys circuits on them, so
  different credentials get different circuits); without them only 0x00;
- ``command``: ``"connect"`` (default), or Tor's extensions ``"resolve"``
  (CMD 0xF0: the proxy resolves ``host``; the reply is the address) and
  ``"resolve_ptr"`` (CMD 0xF1: ``host`` is an IP literal; the reply is its
  name). A resolve stream carries no data: close it after ``StreamConnected``;
  ``"probe"``: only the method negotiation (and the RFC 1929 sub-negotiation when
  credentials are given and the proxy picks it), no request: ``StreamConnected``
  says the proxy is up, speaks SOCKS5 and takes the credentials (a service checks
  its proxy at start this way). ``host``/``port`` are not used (give the proxy's);
  the egress policy does not judge a probe: it goes to the operator's proxy only;
- ``bind``, ``mark``: as for ``tcp``, for the socket to the proxy.

Close reasons: REP 2 and 5 -> ``refused``; 3, 4, 6 -> ``unreachable``; 1, 7,
8 and unknown codes -> ``error``; Tor's onion-service codes 0xF0-0xF7 (prop
304, ``ExtendedErrors``) as in ``_REPLIES``; no acceptable method (0xFF) and
rejected credentials -> ``refused``; a proxy that cannot be reached at all ->
``refused`` (``timeout`` when it did not answer in time); a proxy that speaks
something else -> ``error`` naming what it sent.

Not done here: GSSAPI (method 0x01), BIND and UDP ASSOCIATE, SOCKS4/4a,
chains of proxies, TLS to the proxy, Tor's optimistic data (nothing is sent
before the reply).
"""

# Why not PySocks (which DESIGN.md suggests for SOCKS): PySocks negotiates with
# blocking reads on the socket, so it would stall the bridge's single epoll
# thread for a whole round trip to the proxy (seconds, under Tor), and it has
# no RESOLVE / RESOLVE_PTR. The exchange is small; here it is sans-IO and the
# stream manager does the reads, exactly as many bytes as each step asks for.

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vtl.bridge.transports.base import Handshake, HandshakeStep, TransportError
from vtl.bridge.transports.tcp import TcpTransport

from vtl.errors import LocalProtocolError
from vtl.stream import CloseReason, StreamRequest

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation
NO_AUTH, USERNAME_PASSWORD, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
ATYP_IPV4, ATYP_NAME, ATYP_IPV6 = 1, 3, 4
COMMANDS = {"connect": 0x01, "resolve": 0xF0, "resolve_ptr": 0xF1}
PROBE = "probe"  # the greeting only (see the module docstring): no CMD byte

#: REP code -> (close reason, meaning); RFC 1928 section 6, then Tor's prop 304
_REPLIES: dict[int, tuple[CloseReason, str]] = {
    0x01: ("error", "general SOCKS server failure"),
    0x02: ("refused", "connection not allowed by ruleset"),
    0x03: ("unreachable", "network unreachable"),
    0x04: ("unreachable", "host unreachable"),
    0x05: ("refused", "connection refused"),
    0x06: ("unreachable", "TTL expired"),
    0x07: ("error", "command not supported"),
    0x08: ("error", "address type not supported"),
    0xF0: ("unreachable", "onion service descriptor can not be found"),
    0xF1: ("error", "onion service descriptor is invalid"),
    0xF2: ("unreachable", "onion service introduction failed"),
    0xF3: ("unreachable", "onion service rendezvous failed"),
    0xF4: ("refused", "onion service missing client authorization"),
    0xF5: ("refused", "onion service wrong client authorization"),
    0xF6: ("error", "onion service invalid address"),
    0xF7: ("timeout", "onion service introduction timed out"),
}


def proxy_label(host: str, port: object) -> str:
    """``host:port`` as an operator writes it (``[v6]:port``)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(value: object, low: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= 65535:
        return value
    return None


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]") if host.startswith("[") else host)
    except ValueError:
        return None


def _credential(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise LocalProtocolError(f"socks5 stream option {name}: give a string, not {value!r}")
    raw = value.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise LocalProtocolError(
            f"socks5 stream option {name}: must be 1..255 bytes of UTF-8 (RFC 1929),"
            f" not {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class Socks5Options:
    """A request's options, checked; ``dest`` is ATYP + DST.ADDR + DST.PORT, encoded."""

    proxy_host: str  # brackets stripped
    proxy_port: int
    username: bytes | None
    password: bytes | None
    command: str
    dest: bytes
    target: str  # the destination as a log line names it

    @property
    def label(self) -> str:
        return proxy_label(self.proxy_host, self.proxy_port)


def parse_options(request: StreamRequest) -> Socks5Options:
    """Check a socks5 request's options and destination; LocalProtocolError names the option."""
    opts = request.options
    proxy = opts.get("proxy")
    if proxy is None:
        raise LocalProtocolError("socks5 stream option proxy: missing; give (host, port)")
    if (isinstance(proxy, str) or not isinstance(proxy, Sequence) or len(proxy) != 2
            or not isinstance(proxy[0], str) or not proxy[0].strip("[]")):
        raise LocalProtocolError(f"socks5 stream option proxy={proxy!r}: give (host, port)")
    phost, pport = proxy[0], _port(proxy[1], 1)
    if pport is None:
        raise LocalProtocolError(
            f"socks5 stream option proxy={proxy!r}: port must be an integer 1..65535")
    if phost.startswith("[") and not isinstance(_literal(phost), ipaddress.IPv6Address):
        raise LocalProtocolError(
            f"socks5 stream option proxy={proxy!r}: brackets hold an IPv6 literal")
    user, password = opts.get("username"), opts.get("password")
    if (user is None) != (password is None):
        given, missing = ("username", "password") if password is None else ("password",
                                                                             "username")
        raise LocalProtocolError(
            f"socks5 stream option {given} without {missing}: give both or neither")
    ubytes = None if user is None else _credential("username", user)
    pbytes = None if password is None else _credential("password", password)
    command = opts.get("command", "connect")
    if command not in COMMANDS and command != PROBE:
        raise LocalProtocolError(f"socks5 stream option command={command!r}: give one of "
                                 f"{', '.join(COMMANDS)}, {PROBE}")
    dport = _port(request.port, 1 if command == "connect" else 0)
    if dport is None:
        raise LocalProtocolError(
            f"socks5 stream to {request.host!r}: bad port {request.port!r}")
    host = request.host
    addr = _literal(host) if isinstance(host, str) else None
    if addr is not None:
        atyp = ATYP_IPV4 if addr.version == 4 else ATYP_IPV6
        dest = bytes([atyp]) + addr.packed
        target = str(addr)
    elif command == "resolve_ptr":
        raise LocalProtocolError(
            f"socks5 stream option command='resolve_ptr': host {host!r} is not an IP literal")
    else:
        try:
            name = host.encode("ascii") if host.isascii() else host.encode("idna")
        except (AttributeError, UnicodeError) as exc:
            raise LocalProtocolError(f"socks5 stream to {host!r}: not a host name ({exc})") \
                from None
        if not 1 <= len(name) <= 255:
            raise LocalProtocolError(
                f"socks5 stream to {host!r}: a host name is 1..255 bytes, not {len(name)}")
        dest = bytes([ATYP_NAME, len(name)]) + name
        target = host
    return Socks5Options(phost.strip("[]"), pport, ubytes, pbytes, command,
                         dest + struct.pack("!H", dport), target)


class Step(enum.Enum):
    """Where the exchange is: what the proxy owes us next (RFC 1928 / 1929 names)."""

    METHOD = enum.auto()  # VER METHOD, for our greeting
    AUTH = enum.auto()  # VER STATUS, for our username/password
    REPLY = enum.auto()  # VER REP RSV ATYP, for our request
    REPLY_NAME = enum.auto()  # the length of BND.ADDR when it is a name
    REPLY_ADDR = enum.auto()  # BND.ADDR BND.PORT
    DONE = enum.auto()


class Socks5Handshake(Handshake):
    """One client-side SOCKS5 exchange, sans-IO (one instance per stream)."""

    def __init__(self, opts: Socks5Options):
        self.opts = opts
        self.prefix = f"SOCKS proxy {opts.label}"
        self.step = Step.METHOD
        self.want = 0
        self.atyp = 0
        self._handlers: dict[Step, Callable[[bytes], HandshakeStep]] = {
            Step.METHOD: self._on_method, Step.AUTH: self._on_auth,
            Step.REPLY: self._on_reply, Step.REPLY_NAME: self._on_reply_name,
            Step.REPLY_ADDR: self._on_reply_addr,
        }

    # -- the Handshake interface ------------------------------------------------------

    def start(self) -> HandshakeStep:
        methods = bytes([NO_AUTH]) if self.opts.username is None else bytes(
            [NO_AUTH, USERNAME_PASSWORD])
        return self._expect(Step.METHOD, 2, bytes([VERSION, len(methods)]) + methods)

    def feed(self, data: bytes) -> HandshakeStep:
        handler = self._handlers.get(self.step)
        if handler is None or len(data) != self.want:
            raise TransportError("error", f"{self.prefix}: handshake fed {len(data)} bytes while"
                                          f" waiting for {self.want} ({self.step.name})")
        return handler(bytes(data))

    def failed(self, reason: CloseReason, message: str) -> tuple[CloseReason, str]:
        """The manager gave up (timeout, EOF, reset): say which proxy and at which step."""
        return reason, f"{self.prefix}: {message} (waiting for {self._waiting_for()})"

    # -- one handler per step ---------------------------------------------------------

    def _on_method(self, data: bytes) -> HandshakeStep:
        self._version(data[0], VERSION, "method selection")
        method = data[1]
        if method == NO_ACCEPTABLE:
            if self.opts.username is None:
                why = ("it requires authentication and we offered none"
                       " (give username and password)")
            else:
                why = ("it accepts neither no authentication nor username/password"
                       " (it rejected ours)")
            raise TransportError("refused", f"{self.prefix} accepts none of our methods: {why}")
        if method == NO_AUTH:
            return self._request()  # (a probe is done here)
        if method == USERNAME_PASSWORD and self.opts.username is not None:
            user, password = self.opts.username, self.opts.password
            return self._expect(Step.AUTH, 2, bytes([AUTH_VERSION, len(user)]) + user
                                + bytes([len(password)]) + password)
        raise TransportError("error", f"{self.prefix} chose method {method:#04x},"
                                      " which we did not offer")

    def _on_auth(self, data: bytes) -> HandshakeStep:
        self._version(data[0], AUTH_VERSION, "username/password status")
        if data[1] != 0:
            raise TransportError("refused", f"{self.prefix} rejected the username/password"
                                            " (authentication failed)")
        return self._request()

    def _on_reply(self, data: bytes) -> HandshakeStep:
        self._version(data[0], VERSION, "reply")
        rep, atyp = data[1], data[3]
        if rep != 0:
            reason, meaning = _REPLIES.get(rep, ("error", "unknown reply code"))
            hint = ""
            if rep == 0x07 and self.opts.command != "connect":
                hint = " (it does not speak Tor's RESOLVE extensions)"
            raise TransportError(reason, f"{self.prefix} could not {self._what()}: {meaning}"
                                         f" (REP {rep:#04x}){hint}")
        self.atyp = atyp
        if atyp == ATYP_IPV4:
            return self._expect(Step.REPLY_ADDR, 4 + 2)
        if atyp == ATYP_IPV6:
            return self._expect(Step.REPLY_ADDR, 16 + 2)
        if atyp == ATYP_NAME:
            return self._expect(Step.REPLY_NAME, 1)
        raise TransportError("error", f"{self.prefix} sent a reply with unknown address type"
                                      f" {atyp:#04x}: {data.hex(' ')}")

    def _on_reply_name(self, data: bytes) -> HandshakeStep:
        if data[0] == 0 and self.opts.command == "resolve_ptr":
            raise self._odd_answer("an empty name")
        return self._expect(Step.REPLY_ADDR, data[0] + 2)

    def _on_reply_addr(self, data: bytes) -> HandshakeStep:
        raw, port = data[:-2], struct.unpack("!H", data[-2:])[0]
        command = self.opts.command
        if self.atyp == ATYP_NAME:
            if command == "resolve":
                raise self._odd_answer("a name, not an address")
            try:
                addr = raw.decode("ascii")
            except UnicodeDecodeError:
                if command == "resolve_ptr":
                    raise self._odd_answer(f"a name that is not ASCII: {raw!r}") from None
                addr = raw.decode("ascii", "backslashreplace")
        else:
            if command == "resolve_ptr":
                raise self._odd_answer("an address, not a name")
            addr = str(ipaddress.ip_address(raw))
        self.reply = (addr, port)
        return self._expect(Step.DONE, 0)

    # -- helpers ----------------------------------------------------------------------

    def _request(self) -> HandshakeStep:
        if self.opts.command == PROBE:  # the proxy answered the greeting (and took us in)
            self.reply = (self.opts.proxy_host, self.opts.proxy_port)
            return self._expect(Step.DONE, 0)
        return self._expect(Step.REPLY, 4, bytes(
            [VERSION, COMMANDS[self.opts.command], 0]) + self.opts.dest)

    def _expect(self, step: Step, want: int, send: bytes = b"") -> HandshakeStep:
        self.step, self.want = step, want
        return HandshakeStep(send, want)

    def _odd_answer(self, what: str) -> TransportError:
        return TransportError("error", f"{self.prefix} answered the request to {self._what()}"
                                       f" with {what}")

    def _version(self, got: int, expected: int, what: str) -> None:
        if got != expected:
            raise TransportError("error", f"{self.prefix} is not speaking SOCKS5: its {what}"
                                          f" has version {got:#04x}, not {expected:#04x}")

    def _what(self) -> str:
        """What we asked the proxy for, as in 'could not ...'."""
        opts = self.opts
        if opts.command == "resolve":
            return f"resolve {opts.target}"
        if opts.command == "resolve_ptr":
            return f"resolve the name of {opts.target}"
        port = struct.unpack("!H", opts.dest[-2:])[0]
        return f"connect to {proxy_label(opts.target, port)}"

    def _waiting_for(self) -> str:
        step = self.step
        if step is Step.METHOD:
            return "the method selection after our greeting"
        if step is Step.AUTH:
            return "the verdict on our username/password"
        return f"the reply to our request to {self._what()}"


class Socks5Transport(TcpTransport):
    """Connects to the request's ``proxy`` and asks it for (host, port)."""

    kind = "socks5"
    options = frozenset({"proxy", "username", "password", "command", "bind", "mark",
                         "congestion"})

    def check(self, request: StreamRequest) -> None:
        super().check(request)
        parse_options(request)

    def endpoint(self, request: StreamRequest) -> tuple[str, int]:
        opts = parse_options(request)
        return opts.proxy_host, opts.proxy_port

    def connect_failed(self, request: StreamRequest, reason: CloseReason,
                       message: str) -> tuple[CloseReason, str]:
        proxy = request.options.get("proxy")
        try:
            label = proxy_label(proxy[0], proxy[1])
        except (TypeError, IndexError, KeyError, AttributeError):
            label = repr(proxy)
        if reason == "timeout":
            return "timeout", (f"SOCKS proxy {label} did not answer within"
                               f" {request.timeout_s:g} s")
        return "refused", f"SOCKS proxy {label} is unreachable: {message}"

    def handshake(self, request: StreamRequest) -> Socks5Handshake:
        return Socks5Handshake(parse_options(request))


__all__ = ["PROBE", "Socks5Handshake", "Socks5Options", "Socks5Transport", "parse_options",
           "proxy_label"]
