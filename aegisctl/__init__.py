"""aegisctl: the operator's client for aegisd. It can send a secret in, never read one out."""

__version__ = "0.1.0"
