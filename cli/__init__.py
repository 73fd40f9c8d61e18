"""The `sa-analyze` command line: a thin typer layer over `sa_analysis`."""
