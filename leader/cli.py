"""The `leader` command line: one typer app, one sub-app per stage.

Errors a user can fix (LeaderError) print as one line and exit 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import sys

import typer

from leader.errors import LeaderError
from leader.demo.commands import demo_app
from leader.evaluate.commands import eval_app, report_command
from leader.precompute.commands import cache_app, precompute_app
from leader.reproduce.commands import reproduce_command
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
app.add_typer(demo_app, name="demo")
app.command("reproduce")(reproduce_command)


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    """Shards -> teacher-embedding cache -> student -> evaluation."""


@app.command()
def version():
    """Print the leader version."""
    import leader

    typer.echo(leader.__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer shows usage errors itself; a LeaderError becomes one line and exit 2."""
    run(app, argv)


def run(typer_app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app as the `leader` command: usage errors as typer shows them, a LeaderError as
    one line and exit 2 (`--debug` re-raises it for the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        typer.main.get_command(typer_app).main(args=argv, prog_name="leader", standalone_mode=True)
    except LeaderError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
