"""A fake of the bridge's kernel VXLAN link, for sans-IO tests of services that ask for one."""

from __future__ import annotations

from collections.abc import Sequence

from vtl.frame import Frame
from vtl.vxlan import FrameHandler, VxlanRequest


class FakeVxlanLink:
    """A :class:`vtl.vxlan.VxlanLink` for tests: ``sent`` holds ``(frame, remote)`` per
    frame handed to the kernel (a broadcast or multicast destination is refused, as
    the bridge's link refuses it); :meth:`deliver` calls the service's handler with a
    decapsulated frame as the bridge would. ``fail_sends`` makes :meth:`send` fail."""

    def __init__(self, request: VxlanRequest, handler: FrameHandler):
        self.request = request
        self.handler = handler
        self.remotes = tuple(request.remotes)
        self.sent: list[tuple[Frame, str]] = []
        self.closed = False
        self.fail_sends = False
        self._counters = {"rx": 0, "tx": 0, "tx_dropped": 0, "tx_multicast": 0}

    @property
    def device(self) -> str:
        return f"vtlvx{self.request.vni}"

    def send(self, frame: Frame, remote: str) -> bool:
        assert not self.closed, "send() on a closed vxlan link"
        assert isinstance(frame, Frame)
        if frame.data[0] & 1:
            self._counters["tx_multicast"] += 1
            return False
        if self.fail_sends:
            self._counters["tx_dropped"] += 1
            return False
        self.sent.append((frame, remote))
        self._counters["tx"] += 1
        return True

    def set_remotes(self, remotes: Sequence[str]) -> None:
        self.remotes = tuple(remotes)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def close(self) -> None:
        self.closed = True

    def deliver(self, frame: Frame | bytes, now: float) -> None:
        """A decapsulated frame arrives (nothing once closed, as with the bridge)."""
        if self.closed:
            return
        self._counters["rx"] += 1
        self.handler(frame if isinstance(frame, Frame) else Frame(bytearray(frame)), now)
