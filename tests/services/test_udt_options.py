"""udt options: every mistake names its key (as `vtl check` prints it)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from vtl.bridge.config import parse_config
from vtl.services.udt import UdtOptions
from vtl.services.udt.options import parse_hostport

from vtl.errors import ConfigError


def problems(**service: object) -> list[str]:
    data = {"ports": {"guest": {"kind": "tap", "ifname": "t0"},
                      "uplink": {"kind": "packet", "ifname": "eth0"}},
            "services": [{"use": "udt", **service}]}
    try:
        parse_config(data)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def test_the_documented_example_is_valid() -> None:
    o = UdtOptions(listen="10.190.0.1:9000", fallback="passthrough",
                   peers=[{"prefix": "10.191.2.0/24", "bridge": "10.190.0.2:9000"},
                          {"prefix": "fd00:191:2::/48", "bridge": "10.190.0.3:9000"}])
    assert o.listen_address == ("10.190.0.1", 9000)
    table = o.peer_table()
    assert table.lookup(bytes([10, 191, 2, 9])).where == "10.190.0.2:9000"
    assert table.lookup(bytes([10, 191, 3, 9])) is None
    import ipaddress
    assert table.lookup(ipaddress.ip_address("fd00:191:2::7").packed).where == \
        "10.190.0.3:9000"
    assert problems() == []


@pytest.mark.parametrize("value, expected", [
    ("10.0.0.1:9000", ("10.0.0.1", 9000)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
])
def test_hostport_accepts(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value, words", [
    ("10.0.0.1", "no port"),
    ("::1:9000", "brackets"),
    ("[::1]9000", "[IPv6]:PORT"),
    ("bridge-b:9000", "not an IP address"),
    ("10.0.0.1:0", "1 to 65535"),
    ("10.0.0.1:70000", "1 to 65535"),
    ("10.0.0.1:x", "1 to 65535"),
    ("", "ADDRESS:PORT"),
])
def test_hostport_rejects(value: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_hostport(value)


@pytest.mark.parametrize("service, key, words", [
    ({"listen": "10.190.0.1"}, "services[0].listen", "no port"),
    ({"listen": "::1:9000"}, "services[0].listen", "brackets"),
    ({"peers": [{"prefix": "10.191.2.1/24", "bridge": "10.190.0.2:9000"}]},
     "services[0].peers[0].prefix", "host bits set; did you mean 10.191.2.0/24"),
    ({"peers": [{"prefix": "nonsense", "bridge": "10.190.0.2:9000"}]},
     "services[0].peers[0].prefix", "not an IPv4 or IPv6 prefix"),
    ({"peers": [{"prefix": "10.191.2.0/24", "bridge": "10.190.0.2"}]},
     "services[0].peers[0].bridge", "no port"),
    ({"peers": [{"prefix": "10.191.2.0/24"}]}, "services[0].peers[0].bridge", "missing"),
    ({"peers": [{"prefix": "10.191.2.0/24", "bridge": "10.190.0.2:9000", "x": 1}]},
     "services[0].peers[0].x", "unknown key"),
    ({"peers": [{"prefix": "10.191.2.0/24", "bridge": "10.190.0.2:9000"},
                {"prefix": "10.191.3.0/24", "bridge": "10.190.0.3:9000"},
                {"prefix": "10.191.2.0/24", "bridge": "10.190.0.4:9000"}]},
     "services[0].peers", "peers[2].prefix 10.191.2.0/24 is also peers[0]'s prefix"),
    ({"fallback": "icmp"}, "services[0].fallback", "reset"),
    ({"connect_timeout_s": 0}, "services[0].connect_timeout_s", "greater than 0"),
    ({"mss": 100}, "services[0].mss", "576"),
    ({"window": 10}, "services[0].window", ""),
    ({"mux": "maybe"}, "services[0].mux", ""),
    ({"congestion": "bbr"}, "services[0].congestion", "'vtl' or 'native'"),
    ({"congestion": 1}, "services[0].congestion", "'vtl' or 'native'"),
    ({"max_connections": 0}, "services[0].max_connections", ""),
    ({"bufer_bytes": 1}, "services[0].bufer_bytes", "unknown key"),
])
def test_config_errors_name_the_key(service: dict, key: str, words: str) -> None:
    found = problems(**service)
    assert any(f": {key}: " in p and words in p for p in found), found


def test_ipv6_duplicates_are_caught_after_normalisation() -> None:
    with pytest.raises(ValidationError, match="also peers\\[0\\]"):
        UdtOptions(peers=[{"prefix": "fd00:191:2::/48", "bridge": "10.0.0.1:1"},
                          {"prefix": "fd00:0191:0002:0::/48", "bridge": "10.0.0.1:2"}])


def test_ipv6_bridges_are_refused_with_the_reason() -> None:
    for value in ("[::1]:9000", "[2001:db8::1]:1"):
        with pytest.raises(ValueError, match="IPv4 only"):
            parse_hostport(value)


def test_congestion_defaults_to_vtl_and_takes_native() -> None:
    assert UdtOptions().congestion == "vtl"
    assert UdtOptions(congestion="native").congestion == "native"
    assert problems(congestion="native") == []
    assert UdtOptions(max_rate_mbit=90).max_bw == 11_250_000
