"""User-facing errors: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import os


class UserError(Exception):
    """Bad input (param, path, artifact, data): the message names what is wrong."""


def env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """$name if set (default if unset or empty), refused in one line unless it is one of choices: the switches
    a developer sets in the environment are checked like params."""
    value = os.environ.get(name) or default
    if value is not None and value not in choices:
        raise UserError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value
