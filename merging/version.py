"""The installed mergeyard version (recorded in every output and lineage row)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeyard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
