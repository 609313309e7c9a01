"""On-disk structures and their CRCs, one module per format version.  ``diskimg.format`` is
the current version's module, so that ``from diskimg import format as fmt`` reads as before."""
from diskimg.format.v1 import *  # noqa: F401,F403
