"""Entry point of the `paceline` console script."""

import typer

app = typer.Typer(name="paceline", no_args_is_help=True)
