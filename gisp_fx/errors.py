"""The one exception type gisp-fx raises for bad input or a failed stage."""


class GispError(Exception):
    """What failed, where, why, and what to do: the message is meant for the person at the terminal."""
