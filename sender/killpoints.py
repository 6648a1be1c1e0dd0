"""The sender's test-only kill points: ``pagehaul.killpoints`` (shared with the receiver)."""

from pagehaul.killpoints import ENV, killpoint

__all__ = ["ENV", "killpoint"]
