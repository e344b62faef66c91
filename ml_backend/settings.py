"""The backend's settings from the environment, under the names Label Studio's own ML backends use (ours kept).

| setting | Label Studio's name | ours | a file instead |
|---|---|---|---|
| basic-auth login Label Studio sends | ``BASIC_AUTH_USER`` | ``MAMMO_BACKEND_USER`` | |
| its password | ``BASIC_AUTH_PASS`` | ``MAMMO_BACKEND_PASSWORD`` | ``BASIC_AUTH_PASS_FILE``, ``MAMMO_BACKEND_PASSWORD_FILE`` |
| Label Studio's URL (to name readers) | ``LABEL_STUDIO_URL`` (or ``LABEL_STUDIO_HOST``) | | |
| its API token | ``LABEL_STUDIO_API_KEY`` | | ``LABEL_STUDIO_API_KEY_FILE`` |
| log level | ``LOG_LEVEL`` (DEBUG, INFO, ...) | | |
| gunicorn workers / threads | ``WORKERS`` / ``THREADS`` | | |

Secrets come from the environment or from a file (``*_FILE``: the first line, as Docker and Kubernetes
secrets are mounted), never only from a command-line flag: a process's arguments are visible to every
user of the machine (``ps``). Label Studio's ``/setup`` call sends a URL and a token too, used only when these
are not set: that token is the project creator's legacy API token, which Label Studio 1.23 organisations refuse
unless legacy tokens were switched on, so a team's backend is given a personal access token here.
"""

from __future__ import annotations

import os
from pathlib import Path

from workspace.base.errors import MammoError

AUTH_USER = ("MAMMO_BACKEND_USER", "BASIC_AUTH_USER")
AUTH_PASSWORD = ("MAMMO_BACKEND_PASSWORD", "BASIC_AUTH_PASS")
LABEL_STUDIO_URL = ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST")
LABEL_STUDIO_API_KEY = ("LABEL_STUDIO_API_KEY",)
LOG_LEVEL = ("LOG_LEVEL",)
WORKERS = ("WORKERS",)
THREADS = ("THREADS",)


def setting(names: tuple[str, ...], default: str | None = None) -> str | None:
    """The first of ``names`` set to a non-empty value in the environment, else ``default``."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return default


def secret_file(path: str | os.PathLike | None) -> str | None:
    """The first line of a secret's file (None for no file); one clear error when it is unreadable or empty."""
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise MammoError(f"cannot read the secret file {path}: {error.strerror}") from None
    if not lines or not lines[0].strip():
        raise MammoError(f"the secret file {path} is empty")
    return lines[0].strip()


def secret(names: tuple[str, ...]) -> str | None:
    """A secret from the first of ``names`` set, or from the file the first ``NAME_FILE`` set names."""
    value = setting(names)
    if value:
        return value
    for name in names:
        path = os.environ.get(f"{name}_FILE")
        if path:
            return secret_file(path)
    return None


def count(names: tuple[str, ...], default: int) -> int:
    """A positive whole number setting (``WORKERS``, ``THREADS``); one clear error otherwise."""
    value = setting(names)
    if value is None:
        return default
    if not value.strip().isdigit() or int(value) < 1:
        raise MammoError(f"{names[0]}={value!r}: expected a whole number of at least 1")
    return int(value)


def auth() -> tuple[str, str] | None:
    """The basic-auth login (None unless both the user and the password are set)."""
    user, password = setting(AUTH_USER), secret(AUTH_PASSWORD)
    return (user, password) if user and password else None


def labelstudio() -> tuple[str, str] | None:
    """Label Studio's URL and API token from the environment (None unless both are set)."""
    url, token = setting(LABEL_STUDIO_URL), secret(LABEL_STUDIO_API_KEY)
    return (url.rstrip("/"), token) if url and token else None


def log_level(default: str = "INFO") -> str:
    level = (setting(LOG_LEVEL) or default).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise MammoError(f"LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


__all__ = ["AUTH_USER", "AUTH_PASSWORD", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOG_LEVEL", "WORKERS",
           "THREADS", "setting", "secret", "secret_file", "count", "auth", "labelstudio", "log_level"]
