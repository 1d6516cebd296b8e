"""metabench baselines: one adapter module per method, a shared functional core, and the registry."""
