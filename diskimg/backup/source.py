"""A job's source by a name that survives the disk moving from sdb to sdc.

A path (``/dev/disk/by-id/...``, or any device or file) is used as it is: udev's by-id links
already follow the disk.  A serial, WWN, filesystem UUID or partition-table UUID is looked up
among the block devices now present (diskimg.devices.list_devices, which reads udev or sysfs
and ``blkid -p``): exactly one must match, so that two disks answering to one name (a cloned
disk, two loop devices over one file) are refused rather than guessed between.  Whichever way
the device was found, imaging still compares its identity with the parent image's before it
makes a changed-block image.
"""
from __future__ import annotations

import os

from diskimg.backup.config import SourceSpec
from diskimg.errors import SourceError


def _norm(value: str | None) -> str:
    return (value or "").strip().lower().removeprefix("0x")


def _candidates(spec: SourceSpec) -> list[str]:
    from diskimg import devices
    want = _norm(spec.value)
    found: list[str] = []
    for d in devices.list_devices(all_devices=False):
        if spec.kind == "serial" and _norm(d.serial) == want:
            found.append(d.path)
        elif spec.kind == "wwn" and _norm(d.wwn) == want:
            found.append(d.path)
        elif spec.kind == "fs-uuid":
            if _norm(d.uuid) == want and not d.partitions:
                found.append(d.path)
            found += [p.path for p in d.partitions if _norm(p.uuid) == want]
        elif spec.kind == "ptuuid" and _norm(_ptuuid(d.path)) == want:
            found.append(d.path)
    return found


def _ptuuid(path: str) -> str | None:
    from diskimg import devices
    return devices.probe_fs(path).get("PTUUID")


def resolve_source(spec: SourceSpec) -> str:
    """The device node (or file) the job's source is today.  Raises SourceError (exit 2) when
    nothing, or more than one device, answers to the name."""
    if spec.kind == "path":
        if not os.path.exists(spec.value):
            raise SourceError(spec.value, "no such device or file (is the disk attached? a "
                                          "stable name: /dev/disk/by-id/..., or source = "
                                          "{ serial = ... } in the job)")
        return os.path.realpath(spec.value) if spec.value.startswith("/dev/disk/") \
            else spec.value
    found = _candidates(spec)
    if not found:
        raise SourceError(str(spec), "no block device has this "
                                     f"{spec.kind.replace('-', ' ')} now (is the disk attached?)")
    if len(found) > 1:
        raise SourceError(str(spec), f"more than one device answers to it ({', '.join(found)}): "
                                     f"name the source by a path or another id")
    return found[0]
