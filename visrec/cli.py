"""The `visrec` command line: parses arguments, calls a stage, formats the result.

Settings come from the environment (VISREC_*) and `.env`; flags override them. A user mistake ends
with one line on stderr and a non-zero exit code, never a traceback.

This module is the Typer `app` and its list of commands, in the order `visrec --help` shows them; the
commands live by subject in `cli_model` (train), `cli_store` (the store's commands, serve) and
`cli_query` (the reads), on what they share in `cli_common`, which imports none of them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.logging import RichHandler

from visrec.cli_model import train
from visrec.cli_output import err
from visrec.cli_query import duplicates, neighbours, report, similar
from visrec.cli_store import reindex, restore, rollback, serve, snapshot, status, sync

app = typer.Typer(
    help="Visually similar products, filtered by metadata.",
    epilog="Docs: README.md, then docs/cli.md, http-api.md, catalogue.md, configuration.md, operations.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )


# Registered here, in this order: the order `visrec --help` lists them.
for command in (
    train,
    sync,
    reindex,
    rollback,
    similar,
    status,
    report,
    duplicates,
    serve,
    neighbours,
    snapshot,
    restore,
):
    app.command()(command)
