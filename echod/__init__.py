"""echod: a well-kept TCP line-echo daemon with an operator console."""

__version__ = "0.1.0"
