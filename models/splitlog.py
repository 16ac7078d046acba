"""Log lines of a split-TCP service's connections, bounded whatever the guest does.

Theory of operation. A service that terminates the guest's TCP (``pep``, ``socks``,
``udt``) tells an operator about its connections in two kinds of line, both on the
service's own logger and both bounded per service, because the guest chooses how
many connections there are and which addresses their lines would name:

- *connection lines*, at DEBUG (``vtl run -v``, or ``vtl ctl NAME log-level debug``):
  one when a connection opens (the relay is set up: its flow and upstream) and one
  when it ends (flow, outcome, bytes up and down, duration). At most
  :data:`LINES_PER_S` a second; the lines over that are counted, and one
  ``N connection lines suppressed`` line says so when the next second begins
  (:meth:`SplitLog.flush_at` / :meth:`SplitLog.flush`, driven by the table's timer).
  When DEBUG is off they cost one ``isEnabledFor`` and are not counted;
- *failure lines*, at WARNING: a connection that ended badly (timeout, unreachable,
  reset, error, refused) gives one line per outcome every :data:`LOG_EVERY_S`,
  naming the latest cause and how many more ended the same way since the last line;
  and never more than :data:`FAILURE_LINES` every :data:`LOG_EVERY_S` for the
  service altogether, whatever the outcomes and messages (outcomes beyond
  :data:`OUTCOMES_KEPT` share one record). A guest opening to ten thousand dead
  addresses gets a handful of lines, not ten thousand.

The counters (``connections_<outcome>``, ``bytes_up``...) are exact; only lines are
dropped. Nothing here reads a clock: ``now`` comes in with every call.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from vtl.stream import StreamRequest

LINES_PER_S = 20  # connection lines (DEBUG) a second, per service
LOG_EVERY_S = 10.0  # one failure line per outcome per this long
FAILURE_LINES = 10  # failure lines per LOG_EVERY_S, per service, all outcomes together
OUTCOMES_KEPT = 32  # distinct outcomes remembered; the rest share the key "other"


class Window:
    """At most ``limit`` events in each ``period`` (fixed windows: a new one starts at
    the first event after the last one ended); refused events are counted in
    ``suppressed`` until the caller takes them."""

    __slots__ = ("limit", "period", "start", "used", "suppressed")

    def __init__(self, limit: int, period: float):
        self.limit = limit
        self.period = period
        self.start = float("-inf")
        self.used = 0
        self.suppressed = 0

    def take(self, now: float) -> bool:
        """May one more event happen at ``now``? (False counts it as suppressed.)"""
        if now >= self.start + self.period:  # (a ``now`` from before counts in this one)
            self.start, self.used = now, 0
        if self.used < self.limit:
            self.used += 1
            return True
        self.suppressed += 1
        return False

    def ends(self) -> float:
        """When the current window ends."""
        return self.start + self.period


class _Outcome(NamedTuple):
    last: float  # when its last line was logged
    more: int  # connections that ended this way since, without a line


class SplitLog:
    """The connection and failure lines of one service (see the module docstring)."""

    def __init__(self, log: logging.Logger, *, lines_per_s: int = LINES_PER_S,
                 failure_lines: int = FAILURE_LINES, every_s: float = LOG_EVERY_S):
        self.log = log
        self.every_s = every_s
        self.lines = Window(lines_per_s, 1.0)
        self.failures = Window(failure_lines, every_s)
        self._outcomes: dict[str, _Outcome] = {}

    # -- connection lines (DEBUG) ---------------------------------------------------------

    def opened(self, flow: object, upstream: StreamRequest | str | None, now: float) -> None:
        """A connection was set up (``flow`` as the guest sends; ``upstream``: the
        request of its stream, or words saying where it goes)."""
        if self._line(now):
            if isinstance(upstream, StreamRequest):
                upstream = f"{upstream.kind} {upstream.host}:{upstream.port}"
            self.log.debug("connection %s opened: %s", flow, upstream or "no upstream yet")

    def ended(self, flow: object, outcome: str, message: str, bytes_up: int,
              bytes_down: int, duration: float, now: float) -> None:
        """A connection ended (retired) with ``outcome``, having moved these bytes."""
        if self._line(now):
            why = f" ({message})" if message else ""
            self.log.debug("connection %s ended %s%s: %d bytes up, %d bytes down, %.3f s",
                           flow, outcome, why, bytes_up, bytes_down, duration)

    def _line(self, now: float) -> bool:
        if not self.log.isEnabledFor(logging.DEBUG):
            return False
        self.flush(now)
        return self.lines.take(now)

    def flush_at(self) -> float | None:
        """When the count of suppressed connection lines is due, or None."""
        return self.lines.ends() if self.lines.suppressed else None

    def flush(self, now: float) -> None:
        """Say how many connection lines were suppressed, once their second is over."""
        w = self.lines
        if w.suppressed and now >= w.ends():
            n, w.suppressed = w.suppressed, 0
            w.take(now)  # the summary opens the next window and counts in it
            self.log.debug("%d connection lines suppressed (over %d a second)", n, w.limit)

    # -- failure lines (WARNING) ----------------------------------------------------------

    def failed(self, flow: object, outcome: str, message: str, now: float) -> None:
        """A connection ended badly: a WARNING, unless one like it was logged lately or
        the service's failure lines are used up for now."""
        key = outcome
        if key not in self._outcomes and len(self._outcomes) >= OUTCOMES_KEPT:
            key = "other"
        rec = self._outcomes.get(key)
        if rec is not None and now < rec.last + self.every_s:
            self._outcomes[key] = _Outcome(rec.last, rec.more + 1)
            return
        if not self.failures.take(now):  # over the service's bound: count it, no line
            self._outcomes[key] = _Outcome(rec.last if rec else float("-inf"),
                                           (rec.more if rec else 0) + 1)
            return
        self._outcomes[key] = _Outcome(now, 0)
        cause = f"{outcome}: {message}" if message else outcome
        how = "some other way" if key == "other" else key
        more = (f" ({rec.more} more connections ended {how} since the last line)"
                if rec is not None and rec.more else "")
        self.log.warning("connection %s ended: %s%s", flow, cause, more)


__all__ = ["FAILURE_LINES", "LINES_PER_S", "LOG_EVERY_S", "OUTCOMES_KEPT", "SplitLog", "Window"]
