"""The one exception type the CLI turns into a one-line message and exit status 2 (exit_codes.USAGE)."""


class UsageError(Exception):
    """Bad input from the user: unknown names, malformed shapes, unavailable devices, broken plugins."""
