"""Tasks: data (generated or loaded, cached) and metrics."""
