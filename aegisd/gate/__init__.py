"""The gate: the HTTP front door agents call; it injects credentials at the network boundary."""
