"""Reports to look at: one self-contained HTML page of disk health over time (from the health
history) and block maps of images (``html.write_report``).  Above ``health`` and ``image``, below
the CLI; imports nothing until a report is asked for."""
from __future__ import annotations
