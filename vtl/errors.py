"""The project's own exception types.

Every error VTL raises on purpose derives from :class:`VTLError`, so callers
(and property tests) can tell an expected failure from a bug. As in h11, errors
caused by what *we* were asked to do (a bad config, a service misusing the API)
are kept apart from errors caused by what the *network* sent us (a malformed
frame, a peer violating TCP).
"""

from __future__ import annotations


class VTLError(Exception):
    """Base class of every error VTL raises deliberately."""


class LocalProtocolError(VTLError):
    """We were asked to do something invalid (API misuse, impossible field value)."""


class RemoteProtocolError(VTLError):
    """What arrived from the network is malformed or violates a protocol."""


class PacketError(RemoteProtocolError):
    """A frame is truncated or malformed, or lacks the layer that was asked for."""


class ConfigError(VTLError):
    """A configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class SetupError(VTLError):
    """The bridge could not be set up (missing interface, no permission, busy device).

    The message says what failed and what to do about it; the CLI prints it
    without a traceback and exits 1.
    """
