"""Each step's argument list, checked by the `leader` command's own parser before anything runs.

    problem = parse_problem(["eval", "linear-probe", "--shards", "S", "--repr", "teacher:disease", "--out", "E"])

A misspelt option in the pipeline file then fails at once, naming the step, instead of after the
hours the steps before it take. Parsing only reads the arguments: no command is invoked.
"""
from __future__ import annotations

import typer
from typer.core import TyperGroup


def root_command():
    from leader.cli import app

    return typer.main.get_command(app)


def find_command(path: list[str]):
    """The command `leader PATH...` (e.g. ["eval", "linear-probe"]) with its `params`, or None."""
    command = root_command()
    ctx = typer.Context(command, info_name="leader")
    for name in path:
        if not isinstance(command, TyperGroup):
            return None
        found = command.get_command(ctx, name)
        if found is None:
            return None
        command, ctx = found, typer.Context(found, info_name=name, parent=ctx)
    return command


def parse_problem(argv: list[str] | tuple[str, ...]) -> str | None:
    """None when `leader ARGV` parses; otherwise the parser's message (unknown option, bad value, ...)."""
    command = root_command()
    args, name, parent = list(argv), "leader", None
    try:
        while True:
            ctx = command.make_context(name, args, parent=parent)
            if not isinstance(command, TyperGroup):
                return None
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                return None if command.invoke_without_command else f"leader {' '.join(argv[:1])}: missing command"
            name, command, args = command.resolve_command(ctx, rest)
            parent = ctx
    except typer.Exit:
        return None
    except typer.TyperException as e:            # typer's usage errors: unknown option, bad value, ...
        return e.format_message() if hasattr(e, "format_message") else str(e)
