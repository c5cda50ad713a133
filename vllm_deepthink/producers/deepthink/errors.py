"""The Deep-Thinking build's error type (one home, so every build module can raise it)."""


class BuildError(ValueError):
    """A build that cannot run; the message says why and how to fix it."""
