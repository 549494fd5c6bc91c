"""Sidecar layer 4, connections: the asyncio protocols of a client and of an upstream server, and the upstream pools."""
