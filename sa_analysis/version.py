"""The release of sa-analysis (pyproject.toml states the same); its own module, so that nothing inside the package
imports the package root for it."""

__version__ = "0.1.0"
