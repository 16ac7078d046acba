"""The ``puzzle`` service's options, validated as a whole (every error names its key)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vtl import ServiceOptions


class PuzzleOptions(ServiceOptions):
    """Options of the ``puzzle`` service (both roles; each role ignores the other's)."""

    role: Literal["client", "server"] = Field(
        description="client: a proxy that solves for its VM; server: a firewall that "
                    "issues and verifies puzzles for its VM")
    difficulty: int = Field(
        4096, ge=1, le=0x7FFFFFFF,
        description="server: starting difficulty, in expected hashes per puzzle")
    difficulty_min: int = Field(1, ge=1, le=0x7FFFFFFF,
                                description="server: the adjustment never goes below")
    difficulty_max: int = Field(1 << 22, ge=1, le=0x7FFFFFFF,
                                description="server: the adjustment never goes above")
    target_rate: float = Field(
        0.0, ge=0, description="server: admitted flows per second the difficulty is "
                               "adjusted toward each tick (0: fixed difficulty)")
    require: Literal["syn", "udp-new", "all"] = Field(
        "syn", description="server: which packets toward the VM need an answer: TCP SYN "
                           "without ACK; those and the first UDP packet of a flow; every "
                           "IPv4 packet")
    legacy: Literal["drop", "pass"] = Field(
        "drop", description="server: a required packet without client info (a host "
                            "without the proxy)")
    mode: Literal["always", "under_load"] = Field(
        "always", description="server: puzzles always, or only above load_high required "
                              "packets per second (off again below load_low)")
    load_high: float = Field(1000.0, gt=0, description="server: under_load switches on "
                                                        "above this rate (per second)")
    load_low: float = Field(500.0, ge=0, description="server: under_load switches off "
                                                      "below this rate (per second)")
    maturity: int = Field(0, ge=0, le=255, description="server: ticks before an answer "
                                                       "is accepted")
    expiry: int = Field(10, ge=0, le=255, description="server: ticks after which an "
                                                      "answer is refused")
    tick_s: float = Field(1.0, gt=0, le=60, description="server: the secret ring's tick "
                                                        "(one key replaced per tick)")
    ring: int = Field(256, description="server: keys in the secret ring (a power of two, "
                                       "more than expiry)")
    puzzle_rate: float = Field(
        20000.0, gt=0, description="server: puzzles sent per second at most, in all")
    puzzle_burst: int = Field(1000, ge=1, description="server: burst of that budget")
    client_rate: float = Field(
        20.0, gt=0, description="server: puzzles sent per second at most to one address "
                                "(VTL must not be a reflector)")
    client_burst: int = Field(40, ge=1, description="server: burst of that budget")
    max_clients: int = Field(65536, ge=1, le=4_000_000,
                             description="server: addresses whose budgets are kept")
    max_flows: int = Field(65536, ge=1, le=4_000_000,
                           description="server: admitted UDP flows kept (udp-new)")
    flow_timeout_s: float = Field(30.0, gt=0, description="server: an admitted UDP flow "
                                                          "is forgotten after this idle")
    max_difficulty: int = Field(
        1 << 24, ge=1, le=0xFFFFFFFF,
        description="client: abstain from puzzles wider than this (range width)")
    mtu: int = Field(1500, ge=576, le=65535,
                     description="client: the path MTU the options must fit in")
    max_pending: int = Field(256, ge=1, le=65536,
                             description="client: packets kept for re-sending after a solve")
    max_answers: int = Field(4096, ge=1, le=1_000_000,
                             description="client: answers held at most")
    nonce_window_s: float = Field(10.0, gt=0, le=3600,
                                  description="client: a puzzle echoing an older nonce is "
                                              "stale")
    icmp_type: int = Field(38, ge=0, le=255,
                           description="the puzzle's ICMP type (38 is deprecated by IANA; "
                                       "RFC 4727 gives 253 and 254 for experiments)")

    @model_validator(mode="after")
    def _consistent(self) -> PuzzleOptions:
        if self.ring < 2 or self.ring > 0x10000 or self.ring & (self.ring - 1):
            raise ValueError(f"ring: {self.ring} is not a power of two in 2..65536")
        if self.expiry >= self.ring:
            raise ValueError(f"expiry: {self.expiry} must be below ring ({self.ring})")
        if self.maturity > self.expiry:
            raise ValueError(f"maturity: {self.maturity} is after expiry ({self.expiry})")
        if not self.difficulty_min <= self.difficulty <= self.difficulty_max:
            raise ValueError(f"difficulty: {self.difficulty} is outside difficulty_min.."
                             f"difficulty_max ({self.difficulty_min}..{self.difficulty_max})")
        if self.load_low > self.load_high:
            raise ValueError(f"load_low: {self.load_low} is above load_high "
                             f"({self.load_high})")
        return self
