"""Entry point of `sa-analyze`: importing the command modules registers their commands on the app."""

from cli.app import app
from cli import compare, frontier, heads, heal, heatmap, recommend, validate  # noqa: F401  (each registers its command)

if __name__ == "__main__":
    app()
