"""Gloom: a non-durable job-distribution daemon built on Twisted."""

__version__ = "0.1.0"
