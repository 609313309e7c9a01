"""The command line: parsing, rendering, exit codes.  Nothing imports this package."""
