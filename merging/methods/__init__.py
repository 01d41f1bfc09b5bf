"""Merge methods. Importing this package registers every built-in method."""

from merging.methods import (  # noqa: F401  (importing a module registers its methods)
    adamerging, dare, fisher, fw, karcher, linear, model_stock, mudsc, nearswap, passthrough, regmean, sce,
    sparse_task_arithmetic, spherical, ties,
)
from merging.methods.registry import MergeMethod, MethodParams, Patch, Solved, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "MethodParams", "Patch", "Solved", "all_methods", "get_method", "merge_method"]
