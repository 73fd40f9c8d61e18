"""sa-analysis: where do a trained LLM's layers attend alike, which spans can share attention, at what cost.

The data flows one way: loading -> data -> capture -> metrics -> report -> planner -> patch -> validate.
Heavy modules (torch, transformers) are imported by the submodules that need them, so `report` and `planner`
stay usable without a model.
"""

from .version import __version__  # noqa: F401

from .compat import check_versions as _check_versions

_check_versions()  # one warning line when a dependency lies outside the tested ranges (pyproject.toml)


def __getattr__(name: str):
    """Lazy access to `load_shared` / `export_shared` (sa_analysis.shared_model) without importing torch up front."""
    if name in ("load_shared", "export_shared"):
        from . import shared_model

        return getattr(shared_model, name)
    raise AttributeError(f"module 'sa_analysis' has no attribute {name!r}")
