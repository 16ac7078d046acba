"""puzzle: IP puzzles (Feng et al.): a client proxy that solves, a stateless firewall that asks.

Synopsis
    # in front of the server VM
    [[services]]
    use = "puzzle"
    role = "server"
    difficulty = 4096              # expected hashes per puzzle, to start with
    # require = "syn"              # or "udp-new", "all"
    # legacy = "drop"              # hosts without the proxy
    # mode = "always"              # or "under_load" (load_high / load_low)

    # in front of a client VM
    [[services]]
    use = "puzzle"
    role = "client"
    match = "host 10.70.2.20"      # the servers to solve for (puzzles from them too)

What it does to frames
    Both roles speak IPv4 options and one ICMP message, at the IP layer, so the
    VMs' stacks and applications stay unmodified:

    - client info (IP option 0x9E, 12 bytes: nonce, timestamp) on every packet
      the client proxy sends for its VM;
    - puzzle (ICMP type 38, ``icmp_type``): the server's answer to a packet that
      needs one: a range of D candidates and the BLAKE2s hash of the answer under
      a cookie; the client scans the range (D/2 hashes expected);
    - answer (IP option 0x9E, 20 bytes: answer, server timestamp, maturity,
      expiry, cookie), attached with the client info to the client's packets for
      that server and protocol while it is valid.

    ``role = "server"``: toward the guest, a packet that ``require`` names (by
    default a TCP SYN without ACK) passes only with a valid answer, its options
    stripped, so the guest sees a plain SYN; with client info alone it gets a
    puzzle back (rate-limited globally and per address) and is dropped; without
    client info ``legacy`` decides. The server keeps no per-client state: a
    ring of secret keys (``ring``, one replaced per ``tick_s``) indexed by the
    answer's server timestamp verifies it in one keyed hash. Every other packet
    toward the guest passes, our options stripped. Frames from the guest pass.

    ``role = "client"``: from the guest, IPv4 packets get the client info (or the
    held answer); SYNs are MSS-clamped for the 32 option bytes and kept;
    puzzles from the uplink are checked (the nonce is the proxy's own, recent,
    from the right address), solved in the bridge's worker processes, never
    shown to the guest; the kept SYN goes out again with the answer at once.

    Options are inserted after the IP header (IHL, length and header checksum
    fixed; TCP/UDP checksums do not cover them) and removed the same way; offload
    metadata (virtio-net ``csum_start``, ``hdr_len``) moves with them, so GSO
    frames keep their offloads.

Notes
    - Difficulty: ``difficulty`` is in expected hashes; the puzzle's range is
      2 x difficulty - 1 wide. With ``target_rate`` the server doubles or halves it
      each tick toward that rate of admitted flows.
    - Times: ``maturity`` and ``expiry`` count the server's ticks; a client
      proxy assumes its ``tick_s`` is the server's (1 s by default).
    - Changes from the issue's proposal, and why: the range's offset comes from
      the same keyed digest as the answer (as unpredictable, no random call, the
      same request gets the same puzzle); the ring size is a power of two (so
      u16 timestamps wrap onto the same slots); the option's third byte is
      version << 4 | kind and the reserved byte must be 0 (the cookie does not
      cover it); the ICMP header is 52 bytes (2 reserved bytes keep alignment).
    - IPv6 has no such options: with ``role = "server"``, an IPv6 packet that
      would be required is treated as ``legacy``.
    - The client's ``match`` must also let the servers' puzzles in (a host
      filter does; ``tcp port 80`` would let them reach the guest untouched).
    - Bounded: per-address budgets (``max_clients``), admitted UDP flows
      (``max_flows``), held answers (``max_answers``), kept SYNs (``max_pending``),
      solves running (the bridge's per-service bound).

See also
    docs/puzzle.md; Feng, Kaiser, Luu, Shea, "The design and implementation of
    network puzzles" (INFOCOM 2005); RFC 4727 (experimental codepoints).
"""

from __future__ import annotations

from typing import Any

from vtl.services.puzzle.client import SOLVE_BUCKETS, Client
from vtl.services.puzzle.options import PuzzleOptions
from vtl.services.puzzle.server import Server

from vtl import PASS, Direction, Frame, Service, ServiceContext, Verdict

TO_GUEST = Direction.TO_GUEST

__all__ = ["SOLVE_BUCKETS", "Puzzle", "PuzzleOptions"]


class Puzzle(Service):
    name = "puzzle"
    summary = "IP puzzles: a client proxy that solves, a stateless server firewall that asks"
    Options = PuzzleOptions
    default_fail = "closed"
    tunable = frozenset({
        "match", "difficulty", "difficulty_min", "difficulty_max", "target_rate", "legacy",
        "mode", "load_high", "load_low", "puzzle_rate", "puzzle_burst", "client_rate",
        "client_burst", "max_difficulty", "mtu", "maturity", "expiry"})

    options: PuzzleOptions

    def __init__(self, options: PuzzleOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.server: Server | None = None
        self.client: Client | None = None

    def start(self, now: float) -> None:
        if self.options.role == "server":
            self.server = Server(self.options, self.ctx, now)
            self.process = self.server.process  # type: ignore[method-assign]
        else:
            self.client = Client(self.options, self.ctx, now)

    def retune(self, options: PuzzleOptions, now: float) -> None:
        if options.role != self.options.role:
            raise ValueError("role: cannot change while running (reload replaces the "
                             "service)")
        role = self.server or self.client
        if role is not None:
            role.configure(options, now)
        self.options = options

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        server = self.server
        if server is not None:
            return server.inbound(frame, now) if direction is TO_GUEST else PASS
        client = self.client
        if client is None:
            return PASS
        if direction is TO_GUEST:
            return client.inbound(frame, now)  # type: ignore[no-any-return]
        return client.outbound(frame, now)  # type: ignore[no-any-return]

    def poll_at(self) -> float | None:
        if self.server is not None:
            return self.server.next_tick
        return self.client.poll_at() if self.client is not None else None

    def on_timer(self, now: float) -> None:
        if self.server is not None:
            self.server.on_tick(now)
        elif self.client is not None:
            self.client.on_timer(now)

    def stop(self, now: float) -> None:
        if self.client is not None:
            self.client.stop()

    def report(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.options.role}
        if self.server is not None:
            out.update(self.server.report())
        if self.client is not None:
            out.update(self.client.report())
        return out
