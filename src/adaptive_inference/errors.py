"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (param, path, artifact, data): the message names what is wrong."""
