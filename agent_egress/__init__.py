"""agent-egress: egress control for AI coding agents on devboxes."""

__version__ = "0.1.0"
