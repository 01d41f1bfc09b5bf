"""Merge methods. Importing this package registers every built-in method."""

from merging.methods import (  # noqa: F401  (importing a module registers its methods)
    adamerging, cart, dare, fisher, fw, iso_c, iso_cts, karcher, linear, model_stock, mudsc, nearswap, passthrough,
    regmean, sce, sparse_task_arithmetic, spherical, ties, tsv,
)
from merging.methods.registry import MergeMethod, MethodParams, Patch, Solved, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "MethodParams", "Patch", "Solved", "all_methods", "get_method", "merge_method"]
