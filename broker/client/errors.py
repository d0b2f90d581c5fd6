"""The command line tool's one error type, apart from the modules that raise it.

``broker.cli.main`` catches it for every command, ``broker serve`` included; importing
it from ``broker.client.session`` would import requests (and urllib3) in the gunicorn
master, which the gevent worker forbids (see ``broker.server``).
"""

from __future__ import annotations

import shlex
from pathlib import Path

# A source checkout runs the tool through run.py (its virtualenv is not on PATH); an
# installed package puts `broker` on PATH.
_CHECKOUT = Path(__file__).resolve().parents[2]


def command(*args: str) -> str:
    """``broker ARGS`` as the user can paste it here: ``python3 run.py broker ARGS`` in
    a source checkout, ``broker ARGS`` where the package is installed."""
    in_checkout = (_CHECKOUT / "run.py").is_file() and (_CHECKOUT / "broker").is_dir()
    prefix = ["python3", "run.py", "broker"] if in_checkout else ["broker"]
    return shlex.join([*prefix, *args])


class CLIError(Exception):
    """A failure to show the user as is (on stderr), with the exit status to use."""

    def __init__(self, message: str, *, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
