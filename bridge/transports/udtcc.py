"""Congestion controls for UDT sockets: libudt's own (``native``) or VTL's (``vtl``).

Theory of operation. libudt takes a congestion control per socket (``UDT_CC``, a
``CCCFactory``), set before ``connect`` or ``listen``; sockets a listener accepts
inherit its control. udt4py does not expose ``UDT_CC``, so the control lives in a
small C++ extension of this package (``_udtcc``, built from ``udtcc.cpp`` by the
project's own install against Debian's libudt-dev) that links the same system
``libudt.so.0`` as udt4py and reaches the socket by its id (``UDTSocket.socket``).

``vtl`` is model-based in the spirit of BBR: it paces at the bottleneck bandwidth it
measures (the largest delivery rate of the last 10 rounds), keeps about two
bandwidth-delay products in flight, probes with a gain cycle, and does not take
random loss as a congestion signal (loss counts only when the RTT is inflated, i.e.
a queue overflows); ``udtcc.cpp`` has its full theory of operation. ``native`` is
libudt's DAIMD, which cuts its rate on every loss event. Both honour ``max_bw``
(bytes per second, 0: no cap).
"""

from __future__ import annotations

from typing import Final, Literal

Congestion = Literal["vtl", "native"]
CONGESTION: Final[tuple[str, ...]] = ("vtl", "native")
DEFAULT: Final[Congestion] = "vtl"


def available() -> str:
    """"" when the native extension loads, else why not (what to do)."""
    try:
        import vtl.bridge.transports._udtcc  # noqa: F401
    except ImportError as exc:
        return (f"the UDT congestion control extension is not built ({exc}); reinstall VTL "
                "with `make setup` (needs libudt-dev and g++)")
    return ""


def install(udt_socket_id: int, kind: str, max_bw: int = 0) -> None:
    """Give a UDT socket (not yet connected or listening) the control ``kind``.

    ``native`` leaves libudt's own. ValueError for an unknown kind; OSError when libudt
    refuses (the socket is already connected, or gone) or the extension is missing.
    """
    if kind not in CONGESTION:
        raise ValueError(f"unknown UDT congestion control {kind!r} (known: "
                         f"{', '.join(CONGESTION)})")
    if kind == "native":
        return
    why = available()
    if why:
        raise OSError(why)
    import vtl.bridge.transports._udtcc as _udtcc

    _udtcc.install(udt_socket_id, kind, max_bw)


__all__ = ["CONGESTION", "DEFAULT", "Congestion", "available", "install"]
