"""`python -m paceline_cli`: the same as the `paceline` console script."""

from paceline_cli.main import app

app(prog_name="paceline")
