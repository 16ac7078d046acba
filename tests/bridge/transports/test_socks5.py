"""The socks5 transport: option checks, the sans-IO handshake against a scripted
SOCKS5 peer (RFC 1928, RFC 1929, Tor's extensions), property tests of its reads,
and whole streams through a StreamManager and a threaded SOCKS5 server on loopback.

The peer (``socks5peer.py`` beside this file, imported as ``transports_socks5peer``)
parses what the client sends byte by byte and asserts it, so a wrong greeting,
request or credential encoding fails here, not at a real proxy. Every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transports_socks5peer import (
    CONNECT,
    NO_AUTH,
    RESOLVE,
    RESOLVE_PTR,
    USERPASS,
    Outcome,
    Peer,
    TorNet,
    TorPeer,
    TorStream,
    encode_reply,
    exchange,
)
from vtl.bridge.egress import EgressPolicy
from vtl.bridge.streams import StreamManager
from vtl.bridge.transports import Socks5Transport, TransportError, builtin_transports
from vtl.bridge.transports.socks5 import Socks5Handshake

from vtl import LocalProtocolError
from vtl.stream import (
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamRequest,
)

LOG = logging.getLogger("test.socks5")
PROXY = ("127.0.0.1", 1080)
PREFIX = "SOCKS proxy 127.0.0.1:1080"


# -- driving the handshake, sans-IO ----------------------------------------------------------


def request(host: str = "192.0.2.7", port: int = 80, **options) -> StreamRequest:
    options.setdefault("proxy", PROXY)
    return StreamRequest("socks5", host, port, timeout_s=2.5, options=options)


def handshake(req: StreamRequest) -> Socks5Handshake:
    transport = Socks5Transport()
    transport.check(req)
    return transport.handshake(req)


def drive(req: StreamRequest, peer: Peer,
          sends: Callable[[bytes], list[bytes]] = lambda b: [b],
          reads: Callable[[], int] = lambda: 1 << 20) -> Outcome:
    """Run the handshake of ``req`` against ``peer`` as the stream manager does
    (:func:`transports_socks5peer.exchange`)."""
    return exchange(handshake(req), peer, sends, reads)


def expect_error(outcome: Outcome, reason: str, *needles: str) -> str:
    assert outcome.error is not None, outcome
    assert outcome.error.reason == reason, outcome.error.message
    message = outcome.error.message
    assert message.startswith(PREFIX), message
    for needle in needles:
        assert needle in message, message
    return message


# -- options ---------------------------------------------------------------------------


def test_registered_and_endpoint_is_the_proxy():
    transports = builtin_transports()
    assert isinstance(transports["socks5"], Socks5Transport)
    t = transports["socks5"]
    assert t.endpoint(request("example.com", 443)) == PROXY
    assert t.endpoint(request(proxy=("[::1]", 9050))) == ("::1", 9050)
    assert t.endpoint(request(proxy=["tor.internal", 9050])) == ("tor.internal", 9050)


@pytest.mark.parametrize("options", [
    {"proxy": ("127.0.0.1", 1)},
    {"proxy": ["[2001:db8::1]", 65535]},
    {"proxy": ("tor", 9050), "username": "u", "password": "p"},
    {"proxy": PROXY, "username": "x" * 255, "password": "é" * 127},  # 254 bytes
    {"proxy": PROXY, "username": None, "password": None, "command": "connect"},
    {"proxy": PROXY, "command": "resolve_ptr"},
    {"proxy": PROXY, "mark": 7, "bind": "127.0.0.1"},
])
def test_check_accepts(options):
    Socks5Transport().check(request(**options))


@pytest.mark.parametrize(("options", "host", "port", "names"), [
    ({"proxy": None}, "h", 80, "proxy"),
    ({"proxy": "127.0.0.1:1080"}, "h", 80, "proxy"),
    ({"proxy": ("127.0.0.1",)}, "h", 80, "proxy"),
    ({"proxy": ("127.0.0.1", 0)}, "h", 80, "port"),
    ({"proxy": ("127.0.0.1", 65536)}, "h", 80, "port"),
    ({"proxy": ("127.0.0.1", "1080")}, "h", 80, "port"),
    ({"proxy": ("127.0.0.1", True)}, "h", 80, "port"),
    ({"proxy": ("[tor]", 9050)}, "h", 80, "IPv6"),
    ({"proxy": ("", 9050)}, "h", 80, "proxy"),
    ({"username": "u"}, "h", 80, "username without password"),
    ({"password": "p"}, "h", 80, "password without username"),
    ({"username": "u" * 256, "password": "p"}, "h", 80, "username"),
    ({"username": "é" * 128, "password": "p"}, "h", 80, "username"),  # 256 bytes
    ({"username": "u", "password": ""}, "h", 80, "password"),
    ({"username": b"u", "password": "p"}, "h", 80, "username"),
    ({"command": "bind"}, "h", 80, "command"),
    ({"command": "resolve_ptr"}, "example.com", 0, "resolve_ptr"),
    ({"via": 1}, "h", 80, "via"),
    ({}, "h", 0, "port"),
    ({}, "h", 65536, "port"),
    ({}, "", 80, "host name"),
    ({}, "a" * 256, 80, "host name"),
])
def test_check_rejects_naming_the_problem(options, host, port, names):
    if "proxy" not in options:
        options["proxy"] = PROXY
    elif options["proxy"] is None:
        del options["proxy"]
    with pytest.raises(LocalProtocolError, match=names):
        Socks5Transport().check(StreamRequest("socks5", host, port, options=options))


@pytest.mark.parametrize(("reason", "message", "expected"), [
    ("refused", "127.0.0.1: Connection refused",
     ("refused", f"{PREFIX} is unreachable: 127.0.0.1: Connection refused")),
    ("unreachable", "No route to host",
     ("refused", f"{PREFIX} is unreachable: No route to host")),
    ("error", "cannot resolve 'tor'",
     ("refused", f"{PREFIX} is unreachable: cannot resolve 'tor'")),
    ("timeout", "no answer within 2.5 s", ("timeout", f"{PREFIX} did not answer within 2.5 s")),
])
def test_connect_failed_names_the_proxy(reason, message, expected):
    assert Socks5Transport().connect_failed(request(), reason, message) == expected
    v6 = Socks5Transport().connect_failed(request(proxy=("::1", 9050)), reason, message)
    assert v6[1].startswith("SOCKS proxy [::1]:9050 ")


# -- the handshake, sans-IO ---------------------------------------------------------------


@pytest.mark.parametrize(("host", "wire"), [
    ("192.0.2.7", b"\x01\xc0\x00\x02\x07"),
    ("2001:db8::7", b"\x04" + ipaddress.ip_address("2001:db8::7").packed),
    ("[2001:db8::7]", b"\x04" + ipaddress.ip_address("2001:db8::7").packed),
    ("example.com", b"\x03\x0bexample.com"),
    ("abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion",
     b"\x03\x3e" + b"abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion"),
    ("10.0.0.256", b"\x03\x0a10.0.0.256"),  # not a literal: a name, for the proxy to judge
])
def test_connect_sends_the_destination_as_given(host, wire):
    peer = Peer(auth="none")
    out = drive(request(host, 8080), peer)
    assert out.reply == ("10.1.2.3", 4242)
    assert out.sent == b"\x05\x01\x00" + b"\x05\x01\x00" + wire + b"\x1f\x90"
    assert peer.request_bytes == b"\x05\x01\x00" + wire + b"\x1f\x90"
    assert peer.offered == [NO_AUTH] and peer.creds is None
    assert out.wants == [2, 4, 6] and out.leftover == b""


def test_credentials_offer_both_methods_and_are_sent_byte_exact():
    peer = Peer(users={b"alice": "pässword".encode()})
    out = drive(request("example.com", 443, username="alice", password="pässword"), peer)
    assert out.reply == ("10.1.2.3", 4242)
    assert peer.offered == [NO_AUTH, USERPASS]
    assert peer.creds == (b"alice", "pässword".encode())
    assert out.sent[:4] == b"\x05\x02\x00\x02"
    assert out.sent[4:4 + 17] == b"\x01\x05alice\x09p\xc3\xa4ssword"
    assert out.sent[21:24] == b"\x05\x01\x00"  # the request follows at once
    assert out.wants == [2, 2, 4, 6]


def test_credentials_unused_when_the_proxy_picks_no_auth():
    peer = Peer(auth="none")
    out = drive(request(username="alice", password="x"), peer)
    assert out.reply == ("10.1.2.3", 4242)
    assert peer.offered == [NO_AUTH, USERPASS] and peer.creds is None
    assert out.wants == [2, 4, 6]


def test_isolation_each_stream_shows_its_own_credentials():
    log: list[tuple[bytes, bytes]] = []
    for user, password in (("vm1-a", "circuit-1"), ("vm1-b", "circuit-2"), ("vm1-a", "c-1")):
        out = drive(request("example.com", 80, username=user, password=password),
                    Peer(auth="tor", log=log))
        assert out.reply is not None
    assert log == [(b"vm1-a", b"circuit-1"), (b"vm1-b", b"circuit-2"), (b"vm1-a", b"c-1")]


@pytest.mark.parametrize(("bnd", "reply", "wants"), [
    ((1, "10.1.2.3", 4242), ("10.1.2.3", 4242), [2, 4, 6]),
    ((1, "0.0.0.0", 0), ("0.0.0.0", 0), [2, 4, 6]),
    ((4, "2001:db8::1", 1), ("2001:db8::1", 1), [2, 4, 18]),
    ((3, "exit.example.net", 65535), ("exit.example.net", 65535), [2, 4, 1, 18]),
    ((3, "x" * 255, 9), ("x" * 255, 9), [2, 4, 1, 257]),
])
def test_reply_bnd_addr_of_every_type(bnd, reply, wants):
    out = drive(request(), Peer(bnd=bnd, after=b"GET / HTTP/1.0\r\n"))
    assert out.reply == reply
    assert out.wants == wants
    assert out.leftover == b"GET / HTTP/1.0\r\n"  # application bytes are never read


REPLY_CODES = [
    (0x01, "error", "general SOCKS server failure"),
    (0x02, "refused", "not allowed by ruleset"),
    (0x03, "unreachable", "network unreachable"),
    (0x04, "unreachable", "host unreachable"),
    (0x05, "refused", "connection refused"),
    (0x06, "unreachable", "TTL expired"),
    (0x07, "error", "command not supported"),
    (0x08, "error", "address type not supported"),
    (0xF0, "unreachable", "descriptor can not be found"),
    (0xF1, "error", "descriptor is invalid"),
    (0xF2, "unreachable", "introduction failed"),
    (0xF3, "unreachable", "rendezvous failed"),
    (0xF4, "refused", "missing client authorization"),
    (0xF5, "refused", "wrong client authorization"),
    (0xF6, "error", "invalid address"),
    (0xF7, "timeout", "introduction timed out"),
    (0x09, "error", "unknown reply code"),
    (0x7F, "error", "unknown reply code"),
    (0xFF, "error", "unknown reply code"),
]


@pytest.mark.parametrize(("rep", "reason", "meaning"), REPLY_CODES)
def test_every_reply_code(rep, reason, meaning):
    out = drive(request("example.com", 80), Peer(rep=rep))
    expect_error(out, reason, meaning, f"REP {rep:#04x}", "could not connect to example.com:80")
    assert out.wants == [2, 4]  # a failure is final: the rest of the reply is not read
    assert out.leftover == b"\x00\x00\x00\x00\x00\x00"


def test_command_not_supported_to_resolve_says_why():
    out = drive(request("example.com", 0, command="resolve"), Peer(rep=0x07))
    expect_error(out, "error", "command not supported", "RESOLVE extensions")


@pytest.mark.parametrize(("creds", "peer_kw", "needle"), [
    ({}, {"auth": "required"}, "requires authentication and we offered none"),
    ({"username": "u", "password": "p"}, {"method_reply": b"\x05\xff"}, "rejected ours"),
])
def test_no_acceptable_method(creds, peer_kw, needle):
    peer = Peer(**peer_kw)
    out = drive(request(**creds), peer)
    expect_error(out, "refused", "accepts none of our methods", needle)
    assert peer.finished and peer.request is None


def test_wrong_credentials():
    peer = Peer(auth="required", users={b"alice": b"right"})
    out = drive(request(username="alice", password="wrong"), peer)
    assert expect_error(out, "refused") == (
        f"{PREFIX} rejected the username/password (authentication failed)")
    assert peer.creds == (b"alice", b"wrong") and peer.request is None


def test_probe_is_the_greeting_only():
    peer = Peer(auth="none")
    out = drive(request("127.0.0.1", 1080, command="probe"), peer)
    assert out.result == ("reply", PROXY) and out.sent == b"\x05\x01\x00"
    assert out.wants == [2] and peer.request is None


def test_probe_with_credentials_checks_them():
    peer = Peer(auth="required", users={b"alice": b"right"})
    out = drive(request(command="probe", username="alice", password="right"), peer)
    assert out.result == ("reply", PROXY) and peer.creds == (b"alice", b"right")
    assert peer.request is None
    out = drive(request(command="probe", username="alice", password="wrong"),
                Peer(auth="required", users={b"alice": b"right"}))
    expect_error(out, "refused", "authentication failed")


@pytest.mark.parametrize(("peer", "reason", "needle"), [
    (Peer(auth="required"), "refused", "requires authentication"),
    (Peer(method_reply=b"HT"), "error", "not speaking SOCKS5"),
])
def test_probe_names_what_is_wrong(peer, reason, needle):
    expect_error(drive(request(command="probe"), peer), reason, needle)


@pytest.mark.parametrize(("ip", "atyp", "wants"), [
    ("93.184.216.34", 1, [2, 4, 6]), ("2606:2800:220:1::1", 4, [2, 4, 18]),
])
def test_tor_resolve(ip, atyp, wants):
    peer = Peer(names={"example.com": ip})
    out = drive(request("example.com", 0, command="resolve"), peer)
    assert out.reply == (ip, 0) and out.wants == wants
    assert peer.request == (RESOLVE, 3, "example.com", 0)


def test_tor_resolve_failure_is_unreachable():
    peer = Peer(names={})
    out = drive(request("nowhere.invalid", 0, command="resolve"), peer)
    expect_error(out, "unreachable", "could not resolve nowhere.invalid", "host unreachable")
    assert peer.request == (RESOLVE, 3, "nowhere.invalid", 0)


@pytest.mark.parametrize(("ip", "atyp"), [("192.0.2.1", 1), ("2001:db8::53", 4)])
def test_tor_resolve_ptr(ip, atyp):
    peer = Peer(ptrs={ip: "host.example.org"})
    out = drive(request(ip, 0, command="resolve_ptr"), peer)
    assert out.reply == ("host.example.org", 0)
    assert out.wants == [2, 4, 1, 18]
    assert peer.request == (RESOLVE_PTR, atyp, ip, 0)


def test_tor_resolve_ptr_failure():
    out = drive(request("192.0.2.9", 0, command="resolve_ptr"), Peer())
    expect_error(out, "unreachable", "could not resolve the name of 192.0.2.9")


# -- against Tor's SocksPort, byte for byte (TorPeer) ---------------------------------------

ONION = "exampleonionaddressxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.onion"


def test_tor_answers_and_records_every_stream_with_its_credentials():
    net = TorNet(names={"example.com": "93.184.216.34"}, ptrs={"93.184.216.34": "example.com"})
    connect = drive(request("example.com", 443, username="vm1", password="run1"), TorPeer(net))
    assert connect.reply == ("0.0.0.0", 0)  # Tor's BND for a CONNECT
    resolve = drive(request("Example.COM", 0, command="resolve", username="vm2",
                            password="run1"), TorPeer(net))
    assert resolve.reply == ("93.184.216.34", 0)
    ptr = drive(request("93.184.216.34", 0, command="resolve_ptr"), TorPeer(net))
    assert ptr.reply == ("example.com", 0)
    assert net.streams == [
        TorStream(b"vm1", b"run1", "connect", ("example.com", 443), 0),
        TorStream(b"vm2", b"run1", "resolve", ("Example.COM", 0), 0),
        TorStream(None, None, "resolve_ptr", ("93.184.216.34", 0), 0),
    ]


@pytest.mark.parametrize("req", [
    request("nowhere.invalid", 0, command="resolve"),
    request(ONION, 0, command="resolve"),  # Tor never resolves onion names
    request("192.0.2.9", 0, command="resolve_ptr"),
], ids=["unknown", "onion", "ptr"])
def test_tor_resolve_failure_is_rep_4_with_a_zero_atyp(req):
    out = drive(req, TorPeer(TorNet()))
    expect_error(out, "unreachable", "host unreachable", "REP 0x04")
    assert out.wants == [2, 4] and out.leftover == bytes(6)  # ATYP 0: the rest is not read


@pytest.mark.parametrize(("flags", "ip"), [
    ({}, "198.51.100.7"),
    ({"prefer_ipv6": True}, "2001:db8::7"),
    ({"prefer_ipv6": True, "ipv6_traffic": False}, "198.51.100.7"),
    ({"ipv4_traffic": False}, "2001:db8::7"),
])
def test_tor_resolve_gives_one_address_by_the_socksport_flags(flags, ip):
    net = TorNet(names={"dual.example": ("198.51.100.7", "2001:db8::7")}, **flags)
    assert drive(request("dual.example", 0, command="resolve"), TorPeer(net)).reply == (ip, 0)


@pytest.mark.parametrize(("extended", "rep", "reason"), [
    (True, 0xF0, "unreachable"), (False, 0x01, "error"),
])
def test_tor_onion_codes_need_extended_errors(extended, rep, reason):
    net = TorNet(connect_errors={ONION: 0xF0}, extended_errors=extended)
    out = drive(request(ONION, 80), TorPeer(net))
    expect_error(out, reason, f"REP {rep:#04x}", f"could not connect to {ONION}:80")
    assert net.streams == [TorStream(None, None, "connect", (ONION, 80), rep)]


@pytest.mark.parametrize(("peer", "req", "needles"), [
    (Peer(method_reply=b"\x04\x00"), request(), ["not speaking SOCKS5", "version 0x04"]),
    (Peer(method_reply=b"HT"), request(), ["not speaking SOCKS5", "version 0x48"]),
    (Peer(method_reply=b"\x05\x01"), request(), ["method 0x01", "did not offer"]),
    (Peer(method_reply=b"\x05\x02"), request(), ["method 0x02", "did not offer"]),
    (Peer(method_reply=b"\x05\x80"), request(username="u", password="p"), ["method 0x80"]),
    (Peer(auth_reply=b"\x05\x00"), request(username="u", password="p"),
     ["username/password status has version 0x05"]),
    (Peer(reply=b"\x04\x5a\x00\x00\x00\x00\x00\x00"), request(), ["reply has version 0x04"]),
    (Peer(reply=b"\x05\x00\x00\x05"), request(), ["unknown address type 0x05"]),
    (Peer(reply=encode_reply(0, 3, "a.example", 0)), request("example.com", 0, command="resolve"),
     ["resolve example.com", "with a name, not an address"]),
    (Peer(reply=encode_reply(0, 1, "192.0.2.1", 0)), request("192.0.2.1", 0,
                                                             command="resolve_ptr"),
     ["with an address, not a name"]),
    (Peer(reply=b"\x05\x00\x00\x03\x00\x00\x00"), request("192.0.2.1", 0, command="resolve_ptr"),
     ["with an empty name"]),
    (Peer(reply=b"\x05\x00\x00\x03\x02\xff\xfe\x00\x00"),
     request("192.0.2.1", 0, command="resolve_ptr"), ["not ASCII"]),
])
def test_garbage_is_an_error_naming_it(peer, req, needles):
    expect_error(drive(req, peer), "error", *needles)


def test_non_ascii_bnd_name_of_a_connect_is_kept_escaped():
    out = drive(request(), Peer(reply=b"\x05\x00\x00\x03\x02\xff\x41\x00\x07"))
    assert out.reply == ("\\xffA", 7)


@pytest.mark.parametrize(("peer", "waiting"), [
    (Peer(method_reply=b"\x05"), "the method selection after our greeting"),
    (Peer(auth="required", auth_reply=b"\x01"), "the verdict on our username/password"),
    (Peer(reply=b"\x05\x00\x00"), "the reply to our request to connect to 192.0.2.7:80"),
    (Peer(reply=b"\x05\x00\x00\x01\x0a\x00\x00"), "the reply to our request to connect to"),
    (Peer(reply=b"\x05\x00\x00\x03\x05abc"), "the reply to our request to connect to"),
])
def test_short_reply_waits_and_then_names_the_step(peer, waiting):
    req = request(username="u", password="p")
    out = drive(req, peer)
    assert out.stalled and out.error is None, out
    # what the manager does next: EOF or its timeout ends the stream through the hook
    hs = out.hs
    reason, message = hs.failed("error", "upstream closed during the handshake")
    assert reason == "error"
    assert message.startswith(f"{PREFIX}: upstream closed during the handshake (waiting for ")
    assert waiting in message
    assert hs.failed("timeout", "no answer within 2.5 s")[0] == "timeout"


def test_feeding_the_wrong_length_is_an_error():
    hs = handshake(request())
    assert hs.start().want == 2
    with pytest.raises(TransportError) as exc:
        hs.feed(b"\x05\x00\x00")
    assert exc.value.reason == "error" and exc.value.message.startswith(PREFIX)


# -- properties ------------------------------------------------------------------------

HOSTS = st.sampled_from(["192.0.2.7", "2001:db8::7", "example.com", "x" * 255, "bücher.de"])
BND = st.sampled_from([(1, "10.1.2.3", 4242), (4, "2001:db8::1", 1), (3, "exit.example", 0),
                       (3, "y" * 255, 65535), (3, "z", 80)])


@st.composite
def scenarios(draw):
    command = draw(st.sampled_from(["connect", "resolve", "resolve_ptr"]))
    host = draw(st.sampled_from(["192.0.2.7", "2001:db8::7"])) if command == "resolve_ptr" \
        else draw(HOSTS)
    creds = draw(st.sampled_from([{}, {"username": "u", "password": "p"},
                                  {"username": "é" * 127, "password": "ü" * 127}]))
    auth = draw(st.sampled_from(["tor", "none", "required"]))
    users = draw(st.sampled_from([None, {b"nobody": b"x"}]))
    rep = draw(st.sampled_from([0, 0, 0, 1, 4, 5, 0xF3, 0x42]))
    peer = dict(auth=auth, users=users, rep=rep, bnd=draw(BND),
                after=draw(st.binary(max_size=40)),
                names={host: draw(st.sampled_from(["198.51.100.1", "2001:db8::99"]))},
                ptrs={host: draw(st.sampled_from(["a.example", "b" * 200]))})
    return request(host, draw(st.integers(0 if command != "connect" else 1, 65535)),
                   command=command, **creds), peer


def cutter(sizes: list[int]) -> Callable[[bytes], list[bytes]]:
    it = iter(sizes)

    def cut(data: bytes) -> list[bytes]:
        pieces = []
        while data:
            n = next(it, len(data))
            pieces.append(data[:n])
            data = data[n:]
        return pieces

    return cut


@given(scenarios(), st.lists(st.integers(1, 7), max_size=40),
       st.lists(st.integers(1, 7), max_size=200))
def test_reads_are_exact_whatever_the_split(scenario, send_sizes, read_sizes):
    req, peer_kw = scenario
    whole = drive(req, Peer(**peer_kw))
    reads = iter(read_sizes)
    peer = Peer(**peer_kw)
    split = drive(req, peer, sends=cutter(send_sizes), reads=lambda: next(reads, 1 << 20))
    assert split.result == whole.result
    assert split.sent == whole.sent and split.wants == whole.wants
    assert not split.stalled and all(w > 0 for w in split.wants)
    if split.reply is not None:
        # everything the peer said up to its reply was read, and nothing after it
        assert split.leftover == (peer_kw["after"] if peer.request[0] == CONNECT else b"")
        assert peer.app == b""  # nothing was sent after the request
    else:
        assert split.error is not None
        assert split.error.message.startswith(PREFIX)


@given(st.booleans(), st.binary(max_size=300), st.lists(st.integers(1, 9), max_size=60))
def test_any_bytes_from_the_proxy_end_in_a_transport_error_or_a_reply(creds, junk, sizes):
    req = request("example.com", 80, **({"username": "u", "password": "p"} if creds else {}))
    hs = handshake(req)
    step, wire = hs.start(), bytearray(junk)
    while step.want:
        assert 0 < step.want <= 257
        if len(wire) < step.want:
            return  # would wait for more (the manager's timeout ends it)
        chunk = bytes(wire[:step.want])
        del wire[:step.want]
        try:
            step = hs.feed(chunk)
        except TransportError as exc:
            assert exc.reason in ("error", "refused", "unreachable", "timeout")
            assert exc.message.startswith(PREFIX)
            return
    assert isinstance(hs.reply, tuple) and isinstance(hs.reply[1], int)


# -- through a StreamManager, over loopback ---------------------------------------------------


def wait_for(pred: Callable[[], object], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.002)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class EchoServer:
    """Says BANNER on accept, then echoes until EOF and half-closes back."""

    BANNER = b"HELLO from the echo server\n"

    def __init__(self):
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.ls.settimeout(5.0)
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            conn.sendall(self.BANNER)
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.ls.close()


class RelayPeer(Peer):
    """The scripted peer, but CONNECT really connects (``names`` maps host names)."""

    def __init__(self, hosts: dict[str, str], **kw):
        super().__init__(**kw)
        self.hosts = hosts
        self.upstream: socket.socket | None = None

    def answer(self, cmd: int, addr: str, port: int) -> bytes:
        if cmd != CONNECT or self.reply is not None:
            return super().answer(cmd, addr, port)
        try:
            up = socket.create_connection((self.hosts.get(addr, addr), port), timeout=5.0)
        except OSError:
            return encode_reply(5, 1, "0.0.0.0", 0)
        self.upstream = up
        host, bport = up.getsockname()[:2]
        self.bnd = (1 if ":" not in host else 4, host, bport)
        # the first upstream bytes go out in the same write as the reply
        first = up.recv(65536)
        return encode_reply(0, *self.bnd) + first


class Socks5Server:
    """A threaded SOCKS5 server on 127.0.0.1 running a :class:`RelayPeer` per connection.

    ``mode``: ``"serve"`` (answer, relay CONNECT), ``"hang"`` (read, never answer),
    ``"close"`` (read the greeting, close).
    """

    def __init__(self, mode: str = "serve", hosts: dict[str, str] | None = None, **peer_kw):
        self.mode, self.hosts, self.peer_kw = mode, hosts or {}, peer_kw
        self.peers: list[RelayPeer] = []
        self.log: list[tuple[bytes, bytes]] = []
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.ls.settimeout(5.0)
        self.port = self.ls.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def proxy(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.ls.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            if self.mode == "hang":
                while conn.recv(4096):
                    pass
                return
            if self.mode == "close":
                recv_exactly(conn, 3)
                conn.close()
                return
            peer = RelayPeer(self.hosts, log=self.log, **self.peer_kw)
            self.peers.append(peer)
            while not peer.finished:
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(peer.receive(data))
            if peer.upstream is not None:
                self._relay(conn, peer.upstream, bytes(peer.app))
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _relay(a: socket.socket, b: socket.socket, early: bytes) -> None:
        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        with b:
            if early:
                b.sendall(early)
            t = threading.Thread(target=copy, args=(b, a), daemon=True)
            t.start()
            copy(a, b)
            t.join(5.0)

    def close(self) -> None:
        self.ls.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture
def lock() -> threading.Lock:
    return threading.Lock()


@pytest.fixture
def mgr(lock):
    m = StreamManager(lock, None, LOG, "test")
    m.start()
    yield m
    m.stop()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def servers():
    made: list[Socks5Server] = []

    def make(*args, **kw) -> Socks5Server:
        made.append(Socks5Server(*args, **kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


class Rec:
    def __init__(self):
        self.events: list[StreamEvent] = []
        self.at: float | None = None

    def __call__(self, event: StreamEvent, now: float) -> None:
        self.events.append(event)
        if isinstance(event, StreamClosed):
            self.at = time.monotonic()

    @property
    def data(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, StreamData))

    @property
    def final(self) -> StreamClosed | None:
        return next((e for e in self.events if isinstance(e, StreamClosed)), None)


def open_stream(mgr, lock, req: StreamRequest):
    rec = Rec()
    with lock:
        stream = mgr.open(req, rec)
    return stream, rec


@pytest.mark.parametrize(("dest", "creds", "atyp"), [
    ("127.0.0.1", {}, 1),
    ("echo.vtl.invalid", {"username": "alice", "password": "wonderland"}, 3),
])
def test_stream_through_the_proxy(mgr, lock, echo, servers, monkeypatch, dest, creds, atyp):
    server = servers(hosts={"echo.vtl.invalid": "127.0.0.1"},
                     users={b"alice": b"wonderland"} if creds else None)
    looked_up: list[object] = []
    real_getaddrinfo = socket.getaddrinfo

    def spy(host, *args, **kw):
        looked_up.append(host)
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    stream, rec = open_stream(mgr, lock, StreamRequest(
        "socks5", dest, echo.port, timeout_s=5.0, options={"proxy": server.proxy, **creds}))
    wait_for(lambda: rec.events and (rec.final or rec.data))
    assert isinstance(rec.events[0], StreamConnected), rec.events
    peer = server.peers[0]
    assert rec.events[0].reply == (peer.bnd[1], peer.bnd[2])
    assert rec.events[0].reply[0] == "127.0.0.1" and rec.events[0].reply[1] > 0
    # the banner came in one write with the SOCKS reply: it must be the first StreamData
    assert isinstance(rec.events[1], StreamData)
    assert rec.events[1].data.startswith(EchoServer.BANNER[:1])
    wait_for(lambda: len(rec.data) >= len(EchoServer.BANNER))
    assert rec.data == EchoServer.BANNER
    payload = bytes(range(256)) * 64
    with lock:
        assert stream.write(payload) == len(payload)
        stream.shutdown_write()
    wait_for(lambda: rec.final is not None)
    assert rec.data == EchoServer.BANNER + payload
    assert any(isinstance(e, StreamEnded) for e in rec.events)
    assert rec.final.reason == "closed", rec.final
    assert peer.request == (CONNECT, atyp, dest, echo.port)
    assert server.log == ([(b"alice", b"wonderland")] if creds else [])
    assert peer.offered == ([NO_AUTH, USERPASS] if creds else [NO_AUTH])
    if atyp == 3:
        assert dest not in looked_up  # never resolved here: no DNS leak


def test_resolve_through_the_manager(mgr, lock, servers):
    server = servers(names={"db.example": "2001:db8::5"})
    _, rec = open_stream(mgr, lock, StreamRequest(
        "socks5", "db.example", 0, timeout_s=5.0,
        options={"proxy": server.proxy, "command": "resolve"}))
    wait_for(lambda: rec.events)
    assert isinstance(rec.events[0], StreamConnected)
    assert rec.events[0].reply == ("2001:db8::5", 0)
    with lock:
        rec.events[0].stream.close()
    wait_for(lambda: rec.final is not None)
    assert server.peers[0].request == (RESOLVE, 3, "db.example", 0)


def test_proxy_port_closed_is_refused_at_once(mgr, lock):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connects are refused
        start = time.monotonic()
        _, rec = open_stream(mgr, lock, StreamRequest(
            "socks5", "example.com", 80, timeout_s=5.0, options={"proxy": ("127.0.0.1", port)}))
        wait_for(lambda: rec.final is not None, 2.0)
    assert [type(e) for e in rec.events] == [StreamClosed]
    assert rec.final.reason == "refused"
    assert rec.final.message.startswith(f"SOCKS proxy 127.0.0.1:{port} is unreachable: ")
    assert rec.at - start < 1.0


def test_proxy_rejecting_credentials_is_refused(mgr, lock, servers):
    server = servers(auth="required", users={b"alice": b"right"})
    _, rec = open_stream(mgr, lock, StreamRequest(
        "socks5", "example.com", 80, timeout_s=5.0,
        options={"proxy": server.proxy, "username": "alice", "password": "wrong"}))
    wait_for(lambda: rec.final is not None)
    assert [type(e) for e in rec.events] == [StreamClosed]
    assert rec.final.reason == "refused"
    assert rec.final.message == (
        f"SOCKS proxy 127.0.0.1:{server.port} rejected the username/password"
        " (authentication failed)")
    assert server.log == [(b"alice", b"wrong")]


def test_proxy_refusing_the_destination(mgr, lock, servers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
        server = servers()
        _, rec = open_stream(mgr, lock, StreamRequest(
            "socks5", "127.0.0.1", closed_port, timeout_s=5.0, options={"proxy": server.proxy}))
        wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "refused"
    assert rec.final.message.startswith(f"SOCKS proxy 127.0.0.1:{server.port} could not connect")
    assert "(REP 0x05)" in rec.final.message


def test_proxy_that_hangs_times_out(mgr, lock, servers):
    server = servers("hang")
    start = time.monotonic()
    _, rec = open_stream(mgr, lock, StreamRequest(
        "socks5", "example.com", 80, timeout_s=0.3, options={"proxy": server.proxy}))
    wait_for(lambda: rec.final is not None, 3.0)
    assert [type(e) for e in rec.events] == [StreamClosed]
    assert rec.final.reason == "timeout"
    assert 0.3 <= rec.at - start < 2.0
    assert rec.final.message.startswith(f"SOCKS proxy 127.0.0.1:{server.port}: no answer within")
    assert "method selection" in rec.final.message


def test_proxy_closing_during_the_handshake(mgr, lock, servers):
    server = servers("close")
    _, rec = open_stream(mgr, lock, StreamRequest(
        "socks5", "example.com", 80, timeout_s=5.0, options={"proxy": server.proxy}))
    wait_for(lambda: rec.final is not None)
    assert [type(e) for e in rec.events] == [StreamClosed]
    assert rec.final.reason in ("error", "reset")
    assert rec.final.message.startswith(f"SOCKS proxy 127.0.0.1:{server.port}: ")
    assert "method selection" in rec.final.message


def test_probe_through_the_manager_is_not_judged_by_the_egress_policy(mgr, lock, servers):
    """The proxy is the operator's, on loopback: a probe reaches it where the policy
    refuses a guest's stream to the same address."""
    server = servers()
    mgr.policy = EgressPolicy(read_own=lambda: [], watch=False)
    _, rec = open_stream(mgr, lock, StreamRequest(
        "socks5", server.proxy[0], server.port, timeout_s=5.0,
        options={"proxy": server.proxy, "command": "probe"}))
    wait_for(lambda: rec.events)
    assert isinstance(rec.events[0], StreamConnected) and rec.events[0].reply == server.proxy
    with lock:
        rec.events[0].stream.close()
    wait_for(lambda: rec.final is not None)
    assert server.peers[0].request is None and server.peers[0].offered == [NO_AUTH]
    _, guest = open_stream(mgr, lock, StreamRequest(
        "socks5", "127.0.0.1", server.port, timeout_s=5.0, options={"proxy": server.proxy}))
    wait_for(lambda: guest.final is not None)
    assert guest.final.reason == "prohibited"
