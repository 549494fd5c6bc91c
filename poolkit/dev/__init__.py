"""Developer tooling: the local stack, `poolkit check`, `poolkit demo`, the driver comparison, a network delay."""
