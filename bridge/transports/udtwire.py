"""The framing VTL bridges speak inside a UDT connection (sans-IO).

Theory of operation. UDT gives a reliable, ordered byte stream between two
bridges; this module cuts it into messages so that one UDT connection can
carry one stream (per-connection mode) or many (``mux``), with explicit
half-close and reset (a UDT peer's ``close()`` is not reliably visible to the
other side, so the framing says FIN and RST itself). Every message is::

    VERSION(1) TYPE(1) SID(4) LENGTH(4) PAYLOAD(LENGTH)      (big-endian)

``SID`` names the stream (>= 1, chosen by the side that opened the UDT
connection; the other side never opens streams on it). Types and payloads:

- OPEN: FAMILY(1: 4|6) SRC DST (4 or 16 bytes each) SPORT(2) DPORT(2)
  FLAGS(1: bit 0 client MAC follows, bit 1 server MAC follows) [CLIENT_MAC(6)]
  [SERVER_MAC(6)] WINDOW(4) -- the original TCP connection as its client sent it
  (a :class:`vtl.stream.StreamFlow`) and the opener's receive window;
- OPEN_OK: WINDOW(4) -- the acceptor's receive window;
- REFUSE: REASON(1) MESSAGE(UTF-8, <= 1024 bytes);
- DATA: 1..MAX_DATA bytes of the stream;
- FIN (no more DATA on this stream from the sender), RST (the stream is
  dead): empty;
- WINDOW: INCREMENT(4, > 0) -- the receiver consumed that many more bytes.

Flow control is by credit, per stream and per direction: a side may have at
most the peer's window of DATA bytes outstanding (sent and not yet returned
by WINDOW). So a stream whose reader stalls never blocks the others in its
UDT connection, and the receiver's buffer per stream is bounded.

Parsing is strict: an unknown version or type, a bad length, a non-UTF-8
message, a zero sid all raise :class:`UdtWireError` (a
:class:`~vtl.errors.RemoteProtocolError`); the caller resets that UDT
connection. The decoder gives the same messages however the byte stream is
split. Not done here: anything about sockets, time, or which side may send
what when (that is the hub's business).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from vtl.errors import LocalProtocolError, RemoteProtocolError
from vtl.flow import FlowKey
from vtl.stream import StreamFlow

VERSION = 1
HEADER = struct.Struct(">BBII")
MAX_DATA = 256 * 1024
MAX_MESSAGE = 1024
MAX_WINDOW = 1 << 30
TCP = 6  # the only protocol a flow here has (OPEN carries no protocol number)
_U32 = struct.Struct(">I")


class UdtWireError(RemoteProtocolError):
    """The peer bridge sent something that is not valid VTL-over-UDT framing."""


class Type(enum.IntEnum):
    OPEN = 1
    OPEN_OK = 2
    REFUSE = 3
    DATA = 4
    FIN = 5
    RST = 6
    WINDOW = 7


#: close reasons as sent in REFUSE
REASONS = ("refused", "timeout", "unreachable", "error", "reset")
_REASON_CODE = {r: i + 1 for i, r in enumerate(REASONS)}


def check_flow(flow: Any) -> StreamFlow:
    """``flow`` if it is a StreamFlow this framing can carry (a TCP key of 4- or 16-byte
    addresses, MACs empty or 6 bytes); LocalProtocolError when not."""
    if not isinstance(flow, StreamFlow):
        raise LocalProtocolError(f"udt flow must be a StreamFlow, not {type(flow).__name__}")
    k = flow.key
    alen = {4: 4, 6: 16}.get(k.version)
    if alen is None or len(k.src) != alen or len(k.dst) != alen:
        raise LocalProtocolError(f"udt flow {k!r}: addresses do not match IPv{k.version}")
    if k.proto != TCP:
        raise LocalProtocolError(f"udt flow {k}: udt carries TCP only")
    for port in (k.sport, k.dport):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise LocalProtocolError(f"udt flow {k!r}: ports must be 0..65535")
    for name, mac in (("client_mac", flow.client_mac), ("server_mac", flow.server_mac)):
        if len(mac) not in (0, 6):
            raise LocalProtocolError(f"udt flow {name}={mac!r}: give 6 bytes (or none)")
    return flow


@dataclass(frozen=True, slots=True)
class Message:
    """One message: ``flow``/``window`` for OPEN, ``window`` for OPEN_OK and WINDOW
    (the increment), ``reason``/``text`` for REFUSE, ``data`` for DATA."""

    type: Type
    sid: int
    data: bytes = b""
    flow: StreamFlow | None = None
    window: int = 0
    reason: str = ""
    text: str = ""


def _header(t: Type, sid: int, length: int) -> bytes:
    if not 0 < sid < 2**32:
        raise LocalProtocolError(f"udt sid {sid} out of range")
    return HEADER.pack(VERSION, t, sid, length)


def encode_open(sid: int, flow: StreamFlow, window: int) -> bytes:
    k = flow.key
    flags = (1 if flow.client_mac else 0) | (2 if flow.server_mac else 0)
    body = (bytes([k.version]) + k.src + k.dst + struct.pack(">HHB", k.sport, k.dport, flags)
            + flow.client_mac + flow.server_mac + _U32.pack(window))
    return _header(Type.OPEN, sid, len(body)) + body


def encode_open_ok(sid: int, window: int) -> bytes:
    return _header(Type.OPEN_OK, sid, 4) + _U32.pack(window)


def encode_refuse(sid: int, reason: str, text: str) -> bytes:
    raw = text.encode("utf-8", "replace")[:MAX_MESSAGE].decode("utf-8", "ignore").encode()
    body = bytes([_REASON_CODE.get(reason, _REASON_CODE["error"])]) + raw
    return _header(Type.REFUSE, sid, len(body)) + body


def encode_data_header(sid: int, length: int) -> bytes:
    if not 0 < length <= MAX_DATA:
        raise LocalProtocolError(f"udt DATA of {length} bytes (1..{MAX_DATA})")
    return _header(Type.DATA, sid, length)


def encode_data(sid: int, data: bytes) -> bytes:
    return encode_data_header(sid, len(data)) + data


def encode_fin(sid: int) -> bytes:
    return _header(Type.FIN, sid, 0)


def encode_rst(sid: int) -> bytes:
    return _header(Type.RST, sid, 0)


def encode_window(sid: int, increment: int) -> bytes:
    return _header(Type.WINDOW, sid, 4) + _U32.pack(increment)


def _window(raw: bytes, what: str) -> int:
    (w,) = _U32.unpack(raw)
    if not 0 < w <= MAX_WINDOW:
        raise UdtWireError(f"{what}: window {w} out of range 1..{MAX_WINDOW}")
    return w


def _parse_open(sid: int, p: bytes) -> Message:
    if not p or p[0] not in (4, 6):
        raise UdtWireError(f"OPEN: bad address family {p[:1].hex() or 'none'}")
    alen = 4 if p[0] == 4 else 16
    fixed = 1 + 2 * alen + 5
    if len(p) < fixed:
        raise UdtWireError(f"OPEN: {len(p)} bytes, too short")
    sport, dport, flags = struct.unpack_from(">HHB", p, 1 + 2 * alen)
    if flags & ~3:
        raise UdtWireError(f"OPEN: unknown flags {flags:#x}")
    want = fixed + (6 if flags & 1 else 0) + (6 if flags & 2 else 0) + 4
    if len(p) != want:
        raise UdtWireError(f"OPEN: {len(p)} bytes, expected {want}")
    key = FlowKey(p[0], TCP, p[1:1 + alen], sport, p[1 + alen:1 + 2 * alen], dport)
    off = fixed
    client_mac = server_mac = b""
    if flags & 1:
        client_mac, off = p[off:off + 6], off + 6
    if flags & 2:
        server_mac, off = p[off:off + 6], off + 6
    flow = StreamFlow(key, client_mac, server_mac)
    return Message(Type.OPEN, sid, flow=flow, window=_window(p[off:], "OPEN"))


def parse(t: int, sid: int, p: bytes) -> Message:
    """One message from its header fields and payload; UdtWireError when invalid."""
    if sid == 0:
        raise UdtWireError("stream id 0")
    try:
        mt = Type(t)
    except ValueError:
        raise UdtWireError(f"unknown message type {t}") from None
    if mt is Type.DATA:
        if not p:
            raise UdtWireError("empty DATA")
        return Message(mt, sid, data=p)
    if mt is Type.OPEN:
        return _parse_open(sid, p)
    if mt in (Type.OPEN_OK, Type.WINDOW):
        if len(p) != 4:
            raise UdtWireError(f"{mt.name}: {len(p)} bytes, expected 4")
        return Message(mt, sid, window=_window(p, mt.name))
    if mt is Type.REFUSE:
        if not p or not 1 <= p[0] <= len(REASONS) or len(p) > 1 + MAX_MESSAGE:
            raise UdtWireError("REFUSE: bad reason or length")
        try:
            text = p[1:].decode("utf-8")
        except UnicodeDecodeError:
            raise UdtWireError("REFUSE: message is not UTF-8") from None
        return Message(mt, sid, reason=REASONS[p[0] - 1], text=text)
    if p:
        raise UdtWireError(f"{mt.name} with a {len(p)}-byte payload")
    return Message(mt, sid)


class Decoder:
    """Bytes in (any split), messages out; raises UdtWireError and is then dead."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._dead: UdtWireError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._dead is not None:
            raise self._dead
        buf = self._buf
        buf += data
        out: list[Message] = []
        off, size = 0, len(buf)
        try:
            while size - off >= HEADER.size:
                version, t, sid, length = HEADER.unpack_from(buf, off)
                if version != VERSION:
                    raise UdtWireError(f"unknown framing version {version}")
                limit = MAX_DATA if t == Type.DATA else 64 + MAX_MESSAGE
                if length > limit:
                    raise UdtWireError(f"message type {t} of {length} bytes (max {limit})")
                end = off + HEADER.size + length
                if end > size:
                    break
                out.append(parse(t, sid, bytes(buf[off + HEADER.size:end])))
                off = end
        except UdtWireError as exc:
            self._dead = exc
            raise
        finally:
            if off:
                del buf[:off]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


__all__ = [
    "Decoder", "MAX_DATA", "Message", "REASONS", "Type", "UdtWireError", "VERSION",
    "check_flow", "encode_data", "encode_data_header", "encode_fin", "encode_open",
    "encode_open_ok", "encode_refuse", "encode_rst", "encode_window", "parse",
]
