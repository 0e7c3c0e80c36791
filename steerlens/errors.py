"""The base of every error steerlens raises on bad input: the CLI prints these without a traceback."""


class SteerlensError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what to do."""


class ModelError(SteerlensError, ValueError):
    """A model cannot be found, loaded, or steered."""


class SteeringNotApplied(ModelError):
    """An engine's start-up probe found that a vector set written to it does not steer its outputs."""
