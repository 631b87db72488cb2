"""The single source of the tdxtrace version (it is part of every trace's metadata)."""

__version__ = "0.1.0"
