"""Conformance: peers' own test suites and a concurrent differential run through the sidecar."""
