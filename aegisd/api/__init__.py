"""The control API stubs, generated from proto/aegis/v1: the only part of aegisd that aegisctl imports."""
