"""Entry point of `sa-analyze`: importing the command modules registers their commands on the app."""

from cli.app import app
from cli import heatmap  # noqa: F401  (registers `heatmap`)

for _optional in ("recommend", "validate", "compare", "heal"):
    try:
        __import__(f"cli.{_optional}")
    except ModuleNotFoundError as _exc:  # a command whose module is not written yet
        if _exc.name != f"cli.{_optional}":
            raise

if __name__ == "__main__":
    app()
