"""aegisd: the daemon that holds the vault and runs the gate agents call."""

__version__ = "0.1.0"
