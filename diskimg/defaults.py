"""Defaults the CLI shows in its help and the library uses.  Kept apart from imaging.py so that
building the argument parser (``diskimg --help``, ``--version``, ``info``) imports no
compression library."""
from __future__ import annotations

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_LEVEL = 2
# block digest of a new full image, and the ones --digest offers (diskimg.format.digest)
DEFAULT_DIGEST = "blake3"
DIGESTS = ("blake3", "sha256")
# parity of a new image, percent of its size: 32+2 slices per group (docs/FORMAT.md section 16;
# README "Parity": why, and what it survives); 0: none
DEFAULT_PARITY = 6.25
