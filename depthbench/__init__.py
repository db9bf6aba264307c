"""depthbench: depth pruning of causal LLMs, several published methods behind one interface."""

__version__ = "0.1.0"
