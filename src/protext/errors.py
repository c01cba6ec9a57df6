"""The one exception type for bad input, so the CLI can print it without a traceback."""


class ProtextError(Exception):
    """A problem the user can fix: a bad file, key, argument or missing resource."""
