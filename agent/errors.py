"""The gateway's exception tree: one root, one class per kind of failure."""


class LanternError(Exception):
    """Root of every error Lantern raises on purpose."""


class ConfigError(LanternError):
    """A configuration or key file is wrong; the message names the file, key and fix."""


class FrameError(LanternError):
    """Bytes from a link that are not a valid frame; `kind` is the metrics label."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class AuthError(FrameError):
    """A frame whose MAC does not verify, or from a node we hold no key for."""


class StoreError(LanternError):
    """The durable queue cannot take more (disk full, or the cap with policy pause)."""
