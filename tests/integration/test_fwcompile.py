"""The differential test's compiler: firewall options -> an nft forward chain.

The text checks run anywhere; with root, ``nft -c -f`` must accept each ruleset
in a throw-away namespace.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from fwcompile import Unsupported, compile_nft, nft_rate, sysctls
from fwscript import SCRIPTED_OPTIONS

ALL_KINDS = {
    "default_in": "reject", "default_out": "drop",
    "sets": {"office": ["10.0.0.0/8", "fd00::/16"], "v4only": ["192.0.2.0/24"]},
    "timeouts": {"tcp_close": 5, "udp": 10.4, "tcp_syn_sent2": 30},
    "liberal": True, "loose": False, "invalid": "accept",
    "rules": [
        {"dir": "both", "proto": "tcp", "sport": [1, "10-20"], "dport": [80],
         "action": "accept"},
        {"dir": "in", "saddr": ["@office"], "action": "reject"},
        {"dir": "in", "saddr": ["@v4only"], "daddr": ["fd00::1/128"], "action": "accept"},
        {"dir": "out", "proto": "udp", "action": "reject", "reject_with":
         "icmp-net-prohibited"},
        {"dir": "in", "proto": "icmp", "icmp_type": [0, 8], "action": "reject",
         "reject_with": "icmp-proto-unreachable"},
        {"dir": "in", "proto": "tcp", "tcp_flags": "syn,!ack,!rst", "state": ["new"],
         "limit": "0.5/second", "burst": 3, "action": "accept"},
        {"dir": "in", "proto": 132, "dport": [9], "action": "drop", "log": True},
        {"dir": "out", "proto": "icmpv6", "state": ["invalid", "untracked"],
         "action": "accept"},
    ],
}


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()]


def test_the_chain_starts_with_conntrack_and_ends_with_the_defaults() -> None:
    text = compile_nft(SCRIPTED_OPTIONS, "out0", "in0")
    body = lines(text)
    start = body.index("type filter hook forward priority filter; policy drop;")
    assert body[start + 1] == "ct state established,related counter accept"
    assert body[start + 2] == "ct state invalid counter drop"
    assert body[-4:-2] == ['iifname "out0" oifname "in0" counter drop',
                           'iifname "in0" oifname "out0" counter accept']
    assert ('iifname "out0" oifname "in0" meta l4proto tcp th dport { 8000, 8080-8090 } '
            "counter accept") in body
    assert ('iifname "out0" oifname "in0" meta l4proto tcp th dport 9000 counter reject '
            "with tcp reset") in body
    assert ('iifname "out0" oifname "in0" meta l4proto udp th dport 9001 counter reject '
            "with icmpx port-unreachable") in body


def test_every_kind_of_rule() -> None:
    body = lines(compile_nft(ALL_KINDS, "o", "i"))
    assert "ct state established,related counter accept" in body
    assert "ct state invalid counter accept" in body
    # both directions, one rule each (nothing per family in it)
    assert sum("th sport { 1, 10-20 } th dport 80 counter accept" in b for b in body) == 2
    # a set of both families: one rule per family, any protocol -> the reject chain
    assert ('iifname "o" oifname "i" meta nfproto ipv4 ip saddr 10.0.0.0/8 counter '
            "jump reject1") in body
    assert ('iifname "o" oifname "i" meta nfproto ipv6 ip6 saddr fd00::/16 counter '
            "jump reject1") in body
    assert body[body.index("chain reject1 {") + 1:][:2] == [
        "meta l4proto tcp reject with tcp reset", "reject with icmpx port-unreachable"]
    # IPv4 sources and an IPv6 destination: matches nothing, so no rule
    assert not any("192.0.2.0/24" in b for b in body)
    assert any("meta nfproto ipv4 meta l4proto udp counter reject with icmp net-prohibited"
               in b for b in body)
    assert any("meta nfproto ipv6 meta l4proto udp counter reject with icmpv6 "
               "admin-prohibited" in b for b in body)
    assert any("meta l4proto icmp icmp type { 0, 8 } counter reject with icmp "
               "prot-unreachable" in b for b in body)
    assert "limit lim5 { rate 30/minute burst 3 packets }" in body
    assert any('tcp flags & 0x16 == 0x2 ct state new limit name "lim5" counter accept' in b
               for b in body)
    assert any("meta l4proto 132 th dport 9 counter drop" in b for b in body)
    assert any("ct state { invalid, untracked } counter accept" in b for b in body)
    # reject as a default: a reset for TCP, port unreachable for the rest
    assert body[-5:-2] == ['iifname "o" oifname "i" meta l4proto tcp counter reject with '
                           "tcp reset", 'iifname "o" oifname "i" counter reject',
                           'iifname "i" oifname "o" counter drop']


def test_per_source_limits_are_one_dynamic_set_per_family() -> None:
    body = lines(compile_nft(SCRIPTED_OPTIONS))
    assert any(b.startswith("set src10_4 { type ipv4_addr;") for b in body)
    assert any("add @src10_6 { ip6 saddr limit rate 1/second burst 2 packets }" in b
               for b in body)


def test_sysctls() -> None:
    assert sysctls(ALL_KINDS) == {
        "net.netfilter.nf_conntrack_tcp_be_liberal": "1",
        "net.netfilter.nf_conntrack_tcp_loose": "0",
        "net.netfilter.nf_conntrack_tcp_timeout_close": "5",
        "net.netfilter.nf_conntrack_udp_timeout": "10",
    }
    assert sysctls({})["net.netfilter.nf_conntrack_tcp_loose"] == "1"
    assert sysctls(SCRIPTED_OPTIONS)["net.netfilter.nf_conntrack_icmp_timeout"] == "2"


def test_rates() -> None:
    assert nft_rate("10/second") == "10/second"
    assert nft_rate("0.5/second") == "30/minute"
    assert nft_rate("90/minute") == "90/minute"
    assert nft_rate("1.5/minute") == "90/hour"


@pytest.mark.parametrize("options, words", [
    ({"rules": [{"match": "tcp", "action": "drop"}]}, "match"),
    ({"rules": [{"proto": "udp", "action": "reject",
                 "reject_with": "icmp-proto-unreachable"}]}, "ICMPv6"),
    ({"guest_ips": ["10.0.0.1"]}, "anti-spoofing"),
])
def test_what_nft_cannot_say_is_refused(options: dict, words: str) -> None:
    with pytest.raises(Unsupported, match=words):
        compile_nft(options)


def test_invalid_options_are_refused_by_the_services_model() -> None:
    with pytest.raises(ValueError, match="dport"):
        compile_nft({"rules": [{"dport": [80], "action": "accept"}]})


@pytest.fixture
def scratch_ns(root: None) -> Iterator[str]:
    name = "fwc" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("options", [SCRIPTED_OPTIONS, ALL_KINDS, {}],
                         ids=["scripted", "all-kinds", "empty"])
def test_nft_accepts_the_ruleset(scratch_ns: str, options: dict) -> None:
    text = compile_nft(options)
    proc = subprocess.run(["ip", "netns", "exec", scratch_ns, "nft", "-c", "-f", "-"],
                          input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr + "\n" + text
