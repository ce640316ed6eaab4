"""A logging handler that keeps what a logger's records say, to check what a host prints."""

from __future__ import annotations

import logging


class Lines(logging.Handler):
    """The messages of the records a logger hands its handlers (attach it to that logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
