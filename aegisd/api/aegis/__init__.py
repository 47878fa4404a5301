"""Generated from proto/aegis/v1 by proto/generate.py; do not edit."""
