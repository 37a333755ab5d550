"""The `paceline` command line: a client of the admin API (never imports a service)."""

__version__ = "0.1.0"
