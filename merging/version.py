"""The mergeyard version (recorded in every output and lineage row). The one place it is written: pyproject.toml
reads it from here (`[tool.setuptools.dynamic]`), and reading it needs no scan of the installed packages."""

__version__ = "0.1.0"
