"""The gateway's MCP face: the wire (protocol), tool names, the per-caller tool directory and
the exchange that answers one JSON-RPC message. Transports live in `adapters/http/`.
"""
