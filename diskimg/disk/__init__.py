"""Block devices and files as sources and targets: opening them, telling them apart, and what of them is in use (partitions, ext, FAT)."""
