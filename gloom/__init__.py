"""Gloom: a non-durable job-distribution daemon built on Twisted."""

__version__ = "0.1.0"
"""The version of Gloom (setup.cfg takes the package's version from here)."""
