"""Models that combine an attention method (one instance per layer) with a task."""
