"""The control API: gRPC services on the private Unix socket, the admin boundary."""
