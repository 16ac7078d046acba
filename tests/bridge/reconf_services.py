"""Services for the reload tests (loaded as plugins: ``use = "FILE:Class"``)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from vtl import PASS, Direction, Frame, Service, ServiceOptions, Verdict


class TagOptions(ServiceOptions):
    label: str = Field("t", description="what the service records")
    weight: int = Field(0, description="not tunable")


class Tag(Service):
    """Records its label for every frame; ``label`` is tunable."""

    name = "tag"
    Options = TagOptions
    tunable: ClassVar[frozenset[str]] = frozenset({"label"})
    seen: ClassVar[list[str]] = []  # labels of the Tag services frames passed, in order

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        self.seen.append(self.options.label)
        return PASS


class HolderOptions(ServiceOptions):
    held: int = Field(2, description="connections it says it holds")


class Holder(Service):
    """Pretends to hold connections; at stop it sends one frame toward the guest for
    each (as a TCP-terminating service sends its resets)."""

    name = "holder"
    Options = HolderOptions
    stopped = 0

    def connections(self, now: float) -> list[dict[str, Any]]:
        return [{"flow": f"c{i}"} for i in range(self.options.held)]

    def stop(self, now: float) -> None:
        type(self).stopped += 1
        for i in range(self.options.held):
            self.ctx.emit(Frame(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes([i]) * 46),
                          Direction.TO_GUEST)


class FragileOptions(ServiceOptions):
    broken: bool = Field(False, description="start fails")
    mood: str = Field("calm", description="retune to 'angry' fails")


class Fragile(Service):
    """A service whose start or retune fails, to prove a failed reload changes nothing."""

    name = "fragile"
    Options = FragileOptions
    tunable: ClassVar[frozenset[str]] = frozenset({"mood"})
    started = 0
    stopped = 0

    def start(self, now: float) -> None:
        type(self).started += 1
        if self.options.broken:
            raise OSError("address already in use")

    def retune(self, options: Any, now: float) -> None:
        if options.mood == "angry":
            raise ValueError("will not")
        self.options = options

    def stop(self, now: float) -> None:
        type(self).stopped += 1
