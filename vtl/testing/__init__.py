"""The test kit for services: fakes of what the bridge gives a service, and a harness.

Import everything from here (``from vtl.testing import ServiceHarness, FakeContext``);
the fakes live in :mod:`vtl.testing.fakes`, the harness in :mod:`vtl.testing.harness`.

Theory of operation. A service is sans-IO (see :mod:`vtl.service`): frames and
``now`` come in, verdicts come back, and everything else goes through its
context (``emit``, ``count``, ``open_stream``...). So a service can be tested
without a bridge, a network or a clock by handing it a :class:`FakeContext`
that records what it asked for, and by playing the bridge's part by hand.

- :class:`FakeContext` implements :class:`vtl.ServiceContext`: ``emitted``
  holds ``(frame, direction)`` in order (``emitted_at`` the clock at each),
  ``streams`` a :class:`FakeStream` per ``open_stream``, ``listeners`` a
  :class:`FakeListener` per ``listen_streams``, ``datagrams`` a
  :class:`FakeDatagramSocket` per ``open_datagram``, ``links`` a
  :class:`FakeVxlanLink` per ``open_vxlan``, ``jobs`` a :class:`FakeJob` per
  ``compute`` (run in-process, on pickled copies, when the test calls
  ``ctx.run_jobs(now)``), ``sinks``/``files`` what ``open_pcap``/``open_file``
  gave. ``ctx.now`` is the clock the fakes use when they call the service back
  (stream events).
- :class:`FakeStream` records what the service does with a stream (``written``,
  ``shut``, ``paused``, ``local``) and lets the test be the bridge: ``connect``,
  ``data``, ``end``, ``writable``, ``closed(reason)``; each takes an optional
  ``now`` that moves ``ctx.now`` first.
- :class:`ServiceHarness` drives one service the way the chain does, in the
  spirit of mitmproxy's Playbook and h11's event tests: build it from its
  options, ``start(now)``, ``send(frame, direction, now)`` (a :class:`vtl.Frame`,
  a :class:`vtl.Packet`, bytes or a scapy packet), ``advance(to)`` (calls
  ``on_timer`` at each due ``poll_at``, in order), then look at what came out:
  :class:`Out` records per direction (as :class:`vtl.Packet` or scapy), verdicts,
  streams, timers fired, counters and ``report(now)``. It keeps the chain's
  counters (frames in/out, dropped, consumed, injected). Time never goes back.

Example::

    h = ServiceHarness(TtlNorm, min_ttl=64)
    h.start(0.0)
    frame = Ether(dst="02:00:00:00:00:02") / IP(dst="10.0.0.2", ttl=3) / UDP()
    assert h.send(frame, TO_UPLINK, 1.0) is PASS
    [out] = h.take(TO_UPLINK)
    assert out.packet.ip.ttl == 64 and out.scapy()[IP].ttl == 64
    h.advance(to=120.0)  # idle flows age out
    assert h.report()["flows"] == 0

An exception from ``process`` reaches the test, unless the harness is given
a failure policy (``fail="open"`` or ``"closed"``): then, as in the chain, a
frame the service found malformed (:class:`vtl.RemoteProtocolError`, which
:class:`vtl.PacketError` is) counts as ``malformed``, any other exception as
``errors``, the exception is kept in ``errors`` and the policy decides.

What it does not do: run a chain of several services, apply ``match`` filters,
or do any I/O (scapy is imported only by the helpers that convert).
"""

from vtl.testing.fakes import (
    FakeContext,
    FakeDatagramSocket,
    FakeJob,
    FakeListener,
    FakeOffer,
    FakeStream,
    FakeVxlanLink,
    FakeWatch,
    MemorySink,
    ScapySink,
    run_timers,
    tag_of,
    tagged_frame,
    udp_frame,
)
from vtl.testing.harness import Out, ServiceHarness, as_frame, call_report

__all__ = [
    "FakeContext", "FakeDatagramSocket", "FakeJob", "FakeListener", "FakeOffer", "FakeStream",
    "FakeVxlanLink", "FakeWatch",
    "MemorySink", "Out",
    "ScapySink",
    "ServiceHarness", "as_frame", "call_report", "run_timers", "tag_of", "tagged_frame",
    "udp_frame",
]
