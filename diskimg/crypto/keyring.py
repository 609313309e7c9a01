"""What the running command was given to unlock encrypted images: a key file, a passphrase, or a
typed-back paper key (the master key itself), and the master keys unlocked so far.

Why a context variable and not a parameter: every path that opens an image (chain resolution,
restore, verify, the block view that mount and export read through, a parent found in a
search directory) must unlock it the same way, and threading a key argument through each of
them would make every reader of images a key handler.  The CLI wraps a command in
``using(credentials)``; ImageReader asks `given()` when it meets an encrypted header.  A chain
is unlocked once: the master key opened for its first image is kept here by key id (in memory,
for the command's lifetime, never written anywhere).

Nothing heavy is imported here (the CLI imports it for every command that takes key options).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(eq=False)
class Credentials:
    """What unlocks: the contents of a key file (`key_file` names it in messages), a passphrase,
    and/or a master key typed back from paper.  `unlocked`: master keys opened, by key id."""

    key_file: str | None = None
    key_file_bytes: bytes | None = field(default=None, repr=False)
    passphrase: bytes | None = field(default=None, repr=False)
    master: bytes | None = field(default=None, repr=False)
    # False: only DISKIMG_PASSPHRASE_FILE from the environment, which unlocks encrypted images
    # but does not make a plain image suspect (a downgrade is refused for keys given by option)
    explicit: bool = True
    unlocked: dict[str, bytes] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """What was given, in a message's words (never the secret)."""
        what = []
        if self.key_file is not None:
            what.append(f"the key file {self.key_file}")
        if self.passphrase is not None:
            what.append("the passphrase")
        if self.master is not None:
            what.append("the paper key")
        return " or ".join(what) or "nothing"


_current: contextvars.ContextVar[Credentials | None] = contextvars.ContextVar(
    "diskimg_credentials", default=None)


def given() -> Credentials | None:
    """The credentials of the running command, or None when it was given no key."""
    return _current.get()


def explicit() -> bool:
    """Whether the running command was given a key by option (not only by the environment)."""
    creds = _current.get()
    return creds is not None and creds.explicit


@contextlib.contextmanager
def using(credentials: Credentials | None) -> Iterator[Credentials | None]:
    """Run a block with `credentials` given (None: no key)."""
    token = _current.set(credentials)
    try:
        yield credentials
    finally:
        _current.reset(token)
        if credentials is not None:
            credentials.unlocked.clear()
