"""The UDT congestion controls: the native extension, its Python wrapper, the option path."""

from __future__ import annotations

import pytest
from udt4py import UDTSocket
from vtl.bridge.transports import udtcc
from vtl.bridge.transports.udt import UdtTransport
from vtl.bridge.transports.udtsock import set_opts
from vtl.bridge.transports.udtstate import Tuning

from vtl.errors import LocalProtocolError


def test_the_extension_is_built_and_loads() -> None:
    assert udtcc.available() == ""
    from vtl.bridge.transports import _udtcc

    assert callable(_udtcc.install)


@pytest.mark.parametrize("kind", ["vtl", "native"])
def test_install_before_connect(kind: str) -> None:
    sock = UDTSocket()
    try:
        udtcc.install(sock.socket, kind, 0)
        udtcc.install(sock.socket, kind, 12_500_000)  # again, with a cap: replaces it
    finally:
        sock.close()


def test_unknown_kind_and_bad_socket_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown UDT congestion control 'bbr'"):
        udtcc.install(0, "bbr")
    from vtl.bridge.transports import _udtcc

    with pytest.raises(ValueError, match="known: vtl, native"):
        _udtcc.install(0, "cubic", 0)
    with pytest.raises(ValueError, match="max_bw"):
        _udtcc.install(0, "vtl", -1)
    with pytest.raises(OSError, match="UDT_CC on UDT socket 123456789"):
        udtcc.install(123456789, "vtl")


def test_set_opts_applies_the_tunings_control() -> None:
    sock = UDTSocket()
    try:
        set_opts(sock, Tuning(1500, 1 << 20, 0, "vtl"))
        set_opts(sock, Tuning(1500, 1 << 20, 1_000_000, "native"))
    finally:
        sock.close()


def test_transport_option_congestion() -> None:
    t = UdtTransport()
    assert t._settings({}).congestion == "vtl"
    assert t._settings({"congestion": "native"}).congestion == "native"
    with pytest.raises(LocalProtocolError, match="congestion='reno'"):
        t._settings({"congestion": "reno"})
    assert "congestion" in t.options
