"""mosc's exception types: what the user sees when something is wrong or stopped."""


class MoscError(Exception):
    """An error with a one-line message meant for the user; the CLI prints it and exits 2."""

    exit_code = 2


class Interrupted(MoscError):
    """Ctrl-C, reported with what was kept and how to continue; the CLI exits 130 (128 + SIGINT)."""

    exit_code = 130
