"""User-facing errors: one clear line, raised before expensive work where possible."""


class DepthbenchError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class ConfigError(DepthbenchError, ValueError):
    """A configuration value is invalid; the message names the value and what is allowed."""


class NumericalError(DepthbenchError, ArithmeticError):
    """Statistics or fitted weights are not finite, or a linear system cannot be solved."""
