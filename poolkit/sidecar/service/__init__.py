"""Sidecar layer 5, service: the Sidecar (listeners, reload, drain), admin console, cancels, HTTP, tasks, CLI."""
