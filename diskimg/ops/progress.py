"""How an operation reports its progress: a `Progress` object it is given, told the total once it
knows it, then each piece done.

The library never prints (the CLI owns the terminal), and only the operation knows what it
counts: imaging the source's size, restore the image's size once the overwrite question is
answered, verify the size of every image of the chain.  So the total travels with the progress
instead of being guessed by the caller (which would have to open the source or the chain a second
time just to size a bar).  `start` comes before the first `advance`; an operation that fails
before it knows its total never calls `start`.
"""
from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, unit: str = "B") -> None:
        """The work is `total` units (bytes unless `unit` says otherwise); nothing done yet."""

    def advance(self, n: int) -> None:
        """`n` more units are done."""
