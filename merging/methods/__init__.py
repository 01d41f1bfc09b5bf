"""Merge methods. Importing this package registers every built-in method."""

from merging.methods import adamerging, dare, fisher, fw, linear, mudsc, regmean, ties  # noqa: F401  (registers them)
from merging.methods.registry import MergeMethod, MethodParams, Patch, Solved, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "MethodParams", "Patch", "Solved", "all_methods", "get_method", "merge_method"]
