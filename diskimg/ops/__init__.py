"""The operations: the pipeline they share, imaging, restore, verify, rescue."""
