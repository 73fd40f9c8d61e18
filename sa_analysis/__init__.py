"""sa-analysis: where do a trained LLM's layers attend alike, which spans can share attention, at what cost.

The data flows one way: loading -> data -> capture -> metrics -> report -> planner -> patch -> validate.
Heavy modules (torch, transformers) are imported by the submodules that need them, so `report` and `planner`
stay usable without a model.
"""

__version__ = "0.1.0"
