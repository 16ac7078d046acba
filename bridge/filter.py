"""`match` expressions: libpcap filters compiled with pcapy-ng.

A service scoped with ``match = "tcp port 80"`` sees only frames the BPF
program accepts; the others pass it untouched. Compilation happens once, at
config time, so a bad expression is a config error naming the key.

pcapy's ``BPFProgram.filter`` wants immutable ``bytes``; frames are
``bytearray``, so a match costs one copy of the frame plus ~230 ns here.
"""

from __future__ import annotations

import pcapy

from vtl.errors import ConfigError

_SNAPLEN = 262144  # large enough for 64 KB GSO frames


class MatchFilter:
    """A compiled libpcap filter over Ethernet frames."""

    __slots__ = ("expression", "_program")

    def __init__(self, expression: str):
        self.expression = expression
        try:
            self._program = pcapy.compile(pcapy.DLT_EN10MB, _SNAPLEN, expression, 1, 0)
        except pcapy.PcapError as exc:
            raise ConfigError(f"bad filter expression {expression!r}: {exc}") from None

    def __call__(self, data: bytes | bytearray) -> bool:
        return self._program.filter(data if type(data) is bytes else bytes(data)) != 0

    def __repr__(self) -> str:
        return f"MatchFilter({self.expression!r})"
