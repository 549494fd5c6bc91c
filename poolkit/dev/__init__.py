"""Developer tooling: the local stack (`poolkit dev`), `poolkit check`, `poolkit demo`, the driver comparison."""
