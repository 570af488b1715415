"""The ``edgetl`` command line: a thin layer over the library (:mod:`edgetl.cli.commands`), with one
edge where errors become exit codes (:mod:`edgetl.cli.edge`)."""

from edgetl.cli.cache import cache_group  # registers edgetl cache ls / clear
from edgetl.cli.commands import main
from edgetl.cli.search import search_command  # registers edgetl search
from edgetl.cli.ship import check_command, package_command  # registers check, package, verify, run, bench
from edgetl.cli.views import benchmark_command, report_command  # registers the commands that show a run

__all__ = ["benchmark_command", "cache_group", "check_command", "main", "package_command", "report_command",
           "search_command"]
