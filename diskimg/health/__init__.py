"""SMART health: verdicts with reasons, self-tests."""
