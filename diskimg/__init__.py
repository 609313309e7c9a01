"""diskimg: image block devices, track their changed blocks, restore them block by block, and
watch disk health."""
from __future__ import annotations

__version__ = "0.1.0"
