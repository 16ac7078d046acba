"""Registers ``socks5peer.py`` (the scripted SOCKS5 / Tor peer) as ``transports_socks5peer``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "transports_socks5peer"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME,
                                                   Path(__file__).with_name("socks5peer.py"))
    assert _spec is not None and _spec.loader is not None
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)


# -- asserts inside stream handlers must fail the test ------------------------------------
#
# Handlers run on the stream manager's I/O thread, whose failure guard catches what they
# raise (a service bug must not stop a bridge), so an assert in a test's handler would
# never fail the test. Every handler and offer callback given to a StreamManager in these
# tests is wrapped: an AssertionError it raises is kept, re-raised by the guard as usual,
# and fails the test at teardown.

import pytest  # noqa: E402
from vtl.bridge.streams import StreamManager  # noqa: E402


@pytest.fixture(autouse=True)
def handler_asserts_fail_the_test(monkeypatch: pytest.MonkeyPatch):
    failures: list[BaseException] = []

    def guard(fn):
        def wrapped(*args):
            try:
                return fn(*args)
            except AssertionError as exc:
                failures.append(exc)
                raise
        return wrapped

    real_open, real_listen = StreamManager.open, StreamManager.listen

    def open_(self, request, handler, *rest, **kw):
        return real_open(self, request, guard(handler), *rest, **kw)

    def listen_(self, request, on_offer, *rest, **kw):
        return real_listen(self, request, guard(on_offer), *rest, **kw)

    monkeypatch.setattr(StreamManager, "open", open_)
    monkeypatch.setattr(StreamManager, "listen", listen_)
    yield failures
    if failures:
        raise AssertionError(f"an assert in a stream handler failed on the I/O thread: "
                             f"{failures[0]!r}") from failures[0]
