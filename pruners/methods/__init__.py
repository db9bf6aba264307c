"""The built-in depth-pruning methods, one module per method (or family: ``shortened_llama`` holds PPL and Taylor+,
``baselines`` the two baselines, ``compensation`` Prune&Comp, which wraps any of them).

Each module registers its pruners in `depthbench.pruners.pruner_registry` on import. What the methods share
(the `Pruner` interface, options, candidate scoring, convergence checks, the Hadamard rotation, the sub-block
budget) lives one level up, in `depthbench.pruners`; model changes go through `depthbench.modeling.surgery`.
"""
