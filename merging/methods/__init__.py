"""Merge methods. Importing this package registers every built-in method."""

from merging.methods import dare, fw, linear, mudsc, ties  # noqa: F401  (registration side effect)
from merging.methods.registry import MergeMethod, MethodParams, Patch, Solved, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "MethodParams", "Patch", "Solved", "all_methods", "get_method", "merge_method"]
