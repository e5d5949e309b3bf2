"""What a peer on the network may ask of us: the bounds every front end enforces before it
allocates or waits (``unrollinr serve``, ``unrollinr listen`` and the gadget)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on one stream.

    Attributes
    ----------
    max_message_bytes
        Largest length any message may claim (a config, a header, one acquisition, a
        Gadgetron buffer); checked before anything is read or allocated.
    max_matrix
        Largest encoded or reconstructed matrix side, in samples.
    max_channels
        Most receive channels one acquisition may carry.
    idle_timeout_s
        Seconds a peer may stay silent while we wait for its next bytes; ``None`` waits
        for ever (Gadgetron's own ``<execute>`` stream, whose pauses follow the scanner).
    """

    max_message_bytes: int = 256 * MIB
    max_matrix: int = 1024
    max_channels: int = 128
    idle_timeout_s: float | None = 300.0

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1 or self.max_matrix < 1 or self.max_channels < 1:
            raise ValueError(f"limits must be positive: {self}")
        if self.idle_timeout_s is not None and self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive or None, got {self.idle_timeout_s}")

    def silence(self) -> str:
        """What a peer that stalled past ``idle_timeout_s`` is told."""
        return f"nothing received for {self.idle_timeout_s} s"

    def check_message_size(self, size: int) -> None:
        """Raise :class:`MessageTooLarge` if a peer claims more than ``max_message_bytes``."""
        if size > self.max_message_bytes:
            raise MessageTooLarge(f"a message claims {size} bytes, more than the limit of "
                                  f"{self.max_message_bytes} bytes")


class LimitExceeded(ValueError):
    """A peer asked for more than :class:`StreamLimits` allows."""


class MessageTooLarge(LimitExceeded):
    """A length field claims more than ``max_message_bytes``."""
