"""The base of every error steerlens raises on bad input: the CLI prints these without a traceback."""


class SteerlensError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what to do."""


class ModelError(SteerlensError, ValueError):
    """A model cannot be found, loaded, or steered."""
