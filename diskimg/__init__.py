"""diskimg: image block devices, track their changed blocks, restore them block by block, and
watch disk health.

The library API, without the command line::

    import diskimg

    result = diskimg.create_image("/dev/sdb", "/backup/sdb-full.dimg")
    diskimg.create_image("/dev/sdb", "/backup/sdb-mon.dimg",
                         diskimg.ImageOptions(incremental="/backup/sdb-full.dimg"))
    report = diskimg.verify_image("/backup/sdb-mon.dimg")
    assert report.ok, report.errors
    diskimg.restore_image("/backup/sdb-mon.dimg", "/dev/sdc", confirm=lambda question: True)

Every error is a ``diskimg.DiskimgError`` whose ``exit_code`` says what kind of failure it is.
The names below are imported when first used (PEP 562), so that ``import diskimg`` imports
nothing: the command line's start-up, and where a Ctrl-C can land before its handler, depend on it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    "create_image": ("diskimg.ops.imaging", "create_image"),
    "ImageOptions": ("diskimg.ops.imaging", "ImageOptions"),
    "ImageResult": ("diskimg.ops.imaging", "ImageResult"),
    "rescue_image": ("diskimg.ops.rescue", "rescue_image"),
    "RescueOptions": ("diskimg.ops.rescue", "RescueOptions"),
    "restore_image": ("diskimg.ops.restore", "restore_image"),
    "RestoreResult": ("diskimg.ops.restore", "RestoreResult"),
    "verify_image": ("diskimg.ops.verify", "verify_image"),
    "VerifyResult": ("diskimg.ops.verify", "VerifyResult"),
    "open_chain": ("diskimg.image.chain", "open_chain"),
    "ImageReader": ("diskimg.image.imagefile", "ImageReader"),
    "list_devices": ("diskimg.devices", "list_devices"),
    "check_health": ("diskimg.health", "check"),
    "HealthReport": ("diskimg.health", "HealthReport"),
}
# the errors are the API too
_LAZY.update({name: ("diskimg.errors", name) for name in (
    "BlockError", "ChainError", "ChecksumMismatch", "CorruptImage", "DiskimgError",
    "DiskIOError", "HealthGateFailed", "IncompleteImage", "Interrupted", "JobBusy",
    "MetadataError", "MissingParent",
    "NotAnImage", "OperationFailed", "PermissionDenied", "ReadError", "RestoreFailed",
    "SegmentError", "SmartUnavailable", "SourceError", "TruncatedImage", "UnsafeTarget",
    "UsageError")})

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> object:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'diskimg' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
