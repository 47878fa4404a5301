"""`aegisctl mcp`: the MCP bridge, an agent like any other that AI hosts start as an MCP server.

It holds only an agent token and the gate's URL, and sends every tool call through the gate, so
the gate's whole pipeline applies. It imports nothing from aegisd, not even the API stubs, and
never opens the control socket.
"""
