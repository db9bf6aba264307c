"""Hydra config tree of depthbench (a package so installed copies find it)."""
