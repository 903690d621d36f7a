"""mosc's one exception type."""


class MoscError(Exception):
    """An error with a one-line message meant for the user; the CLI prints it and exits 2."""
