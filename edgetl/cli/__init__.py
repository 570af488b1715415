"""The ``edgetl`` command line: a thin layer over the library (:mod:`edgetl.cli.commands`), with one
edge where errors become exit codes (:mod:`edgetl.cli.edge`)."""

from edgetl.cli.commands import main

__all__ = ["main"]
