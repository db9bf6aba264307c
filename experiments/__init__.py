"""Running experiments: the single-run pipeline (config -> pruned model -> result record)."""
