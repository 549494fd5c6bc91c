"""Reliability suite: faults (relay, bank invariant, recovery), bad input, TLS, secrets, soak."""
