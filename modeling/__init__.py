"""Models: loading, architecture adapters (the only code that touches model internals) and saving."""
