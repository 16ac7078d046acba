"""The base of every header view, and the property factories the views use.

A view is ``(buf, off)``: the frame's ``bytearray`` and the offset where the
header starts. The view's constructor checks once that the fixed header fits
(raising :class:`~vtl.errors.PacketError` otherwise); after that every field is
a property that reads or writes the bytes in place with a precompiled
:class:`struct.Struct`, with no further checks. Nothing is copied.

Invariants:
- Writes through a property are *raw*: they change only the field's bytes,
  never a checksum. :meth:`View.update` writes a field *and* patches the
  header's own checksum incrementally (RFC 1624); address and port helpers on
  the IP and L4 views patch the L4 checksum too.
- A value that does not fit a field raises
  :class:`~vtl.errors.LocalProtocolError` (it is the caller's mistake).
- ``FIELDS`` maps each field name to its ``(offset, size)`` in bytes inside the
  header; :meth:`get`/:meth:`set`/:meth:`update` accept exactly these names.

What it does not do: a view never follows the buffer if it is resized (bytes
inserted or removed before the header): parse again after such a change.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, ClassVar

from vtl.errors import LocalProtocolError
from vtl.packet.checksum import csum_replace

U8 = struct.Struct("!B")
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")


class View:
    """A header at ``buf[off:]``. Subclasses check the length in ``__init__``."""

    __slots__ = ("buf", "off")
    FIELDS: ClassVar[dict[str, tuple[int, int]]] = {}

    def __init__(self, buf: bytearray, off: int = 0) -> None:
        self.buf = buf
        self.off = off

    def get(self, name: str) -> Any:
        """The value of field ``name`` (one of ``FIELDS``)."""
        if name not in self.FIELDS:
            raise LocalProtocolError(f"{type(self).__name__} has no field {name!r}")
        return getattr(self, name)

    def set(self, name: str, value: Any) -> None:
        """Write field ``name`` raw (checksums untouched)."""
        if name not in self.FIELDS:
            raise LocalProtocolError(f"{type(self).__name__} has no field {name!r}")
        setattr(self, name, value)

    def update(self, name: str, value: Any) -> None:
        """Write field ``name`` and patch this header's checksum incrementally."""
        if name not in self.FIELDS:
            raise LocalProtocolError(f"{type(self).__name__} has no field {name!r}")
        rel, size = self.FIELDS[name]
        start = self.off + (rel & ~1)
        end = self.off + ((rel + size + 1) & ~1)
        old = bytes(self.buf[start:end])
        setattr(self, name, value)
        self._patch_checksum(old, bytes(self.buf[start:end]))

    def _patch_checksum(self, old: bytes, new: bytes) -> None:
        """Fold a change of covered bytes into the checksum this header owns."""

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (for logging and tests)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"{type(self).__name__}({fields})"


def patch_field16(buf: bytearray, pos: int, old: bytes, new: bytes) -> None:
    """Apply RFC 1624 to the 16-bit checksum at ``buf[pos]``."""
    hc = (buf[pos] << 8) | buf[pos + 1]
    U16.pack_into(buf, pos, csum_replace(hc, old, new))


def _bad(name: str, value: Any) -> LocalProtocolError:
    return LocalProtocolError(f"value {value!r} does not fit field {name}")


def u8(rel: int, name: str) -> property:
    def fget(self: View) -> int:
        return self.buf[self.off + rel]

    def fset(self: View, value: int) -> None:
        try:
            self.buf[self.off + rel] = value
        except (ValueError, TypeError) as e:
            raise _bad(name, value) from e

    return property(fget, fset, doc=f"{name} (8 bits)")


def uint(st: struct.Struct, rel: int, name: str) -> property:
    unpack_from = st.unpack_from
    pack_into = st.pack_into

    def fget(self: View) -> int:
        return unpack_from(self.buf, self.off + rel)[0]

    def fset(self: View, value: int) -> None:
        try:
            pack_into(self.buf, self.off + rel, value)
        except (struct.error, TypeError) as e:
            raise _bad(name, value) from e

    return property(fget, fset, doc=f"{name} ({st.size * 8} bits)")


def bits(st: struct.Struct, rel: int, shift: int, width: int, name: str) -> property:
    """A bit field of ``width`` bits, ``shift`` bits from the right of a word."""
    unpack_from = st.unpack_from
    pack_into = st.pack_into
    mask = (1 << width) - 1

    def fget(self: View) -> int:
        return (unpack_from(self.buf, self.off + rel)[0] >> shift) & mask

    def fset(self: View, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= mask:
            raise _bad(name, value)
        pos = self.off + rel
        word = unpack_from(self.buf, pos)[0] & ~(mask << shift)
        pack_into(self.buf, pos, word | (value << shift))

    return property(fget, fset, doc=f"{name} ({width} bits)")


def raw(rel: int, size: int, name: str, conv: Callable[[Any], bytes]) -> property:
    """A fixed-size byte field (an address) returned as ``bytes``; setter converts."""

    unpack_from = struct.Struct(f"{size}s").unpack_from

    def fget(self: View) -> bytes:
        return unpack_from(self.buf, self.off + rel)[0]

    def fset(self: View, value: Any) -> None:
        b = conv(value)
        if len(b) != size:
            raise _bad(name, value)
        o = self.off + rel
        self.buf[o : o + size] = b

    return property(fget, fset, doc=f"{name} ({size} bytes)")


class PortsMixin:
    """Port rewriting shared by the TCP and UDP views (source port at 0, destination at 2).

    Relies on the view's ``update`` to patch the checksum the way that protocol needs.
    """

    __slots__ = ()  # keep the views free of a per-instance __dict__

    buf: bytearray
    off: int
    update: Any  # View.update, which comes after this mixin in the MRO

    def set_sport(self, port: int) -> None:
        """Rewrite the source port and patch the checksum (unless partial)."""
        self.update("sport", port)

    def set_dport(self, port: int) -> None:
        """Rewrite the destination port and patch the checksum (unless partial)."""
        self.update("dport", port)

    def swap(self) -> None:
        """Exchange the ports (checksum-neutral)."""
        o, b = self.off, self.buf
        b[o : o + 2], b[o + 2 : o + 4] = b[o + 2 : o + 4], b[o : o + 2]
