"""The command line tool's one error type, apart from the modules that raise it.

``broker.cli.main`` catches it for every command, ``broker serve`` included; importing
it from ``broker.client.session`` would import requests (and urllib3) in the gunicorn
master, which the gevent worker forbids (see ``broker.server``).
"""

from __future__ import annotations


class CLIError(Exception):
    """A failure to show the user as is (on stderr), with the exit status to use."""

    def __init__(self, message: str, *, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
