"""The `leader` command line: one typer app, one sub-app per stage.

Errors a user can fix (LeaderError) print as one line and exit 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import sys

import click
import typer

from leader.errors import LeaderError
from leader.evaluate.commands import eval_app, report_command
from leader.precompute.commands import cache_app, precompute_app
from leader.shards.commands import app as shards_app
from leader.train.commands import register as register_train

app = typer.Typer(
    name="leader",
    help="LeaDER: distil a disease expert and an anatomy expert into one chest X-ray representation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(shards_app, name="shards")
app.add_typer(precompute_app, name="precompute")
app.add_typer(cache_app, name="cache")
register_train(app)
app.add_typer(eval_app, name="eval")
app.command("report")(report_command)


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    """Shards -> teacher-embedding cache -> student -> evaluation."""


@app.command()
def version():
    """Print the leader version."""
    import leader

    typer.echo(leader.__version__)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        typer.main.get_command(app).main(args=argv, prog_name="leader", standalone_mode=False)
    except LeaderError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
