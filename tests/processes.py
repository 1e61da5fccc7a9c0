"""Helpers for tests that launch local processes."""

import socket


def free_port() -> int:
    """A TCP port on localhost that is free now: concurrent test runs must not share a coordinator port."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
