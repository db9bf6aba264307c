"""Models: loading, architecture adapters (the only code that touches model internals), pruning units
(`Unit`: a layer or its attention / MLP sub-block) and saving."""

from depthbench.modeling.units import Unit, normalize_units

__all__ = ["Unit", "normalize_units"]
