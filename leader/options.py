"""`key=value` options from the command line (`--option arch=resnet50`, `--option bits=16`)."""
from __future__ import annotations

from leader.errors import LeaderError


def parse_key_values(pairs: list[str], flag: str = "--option") -> dict:
    """Values are read as YAML scalars, so numbers, booleans and lists arrive typed."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LeaderError(f"{flag} {pair!r} is not key=value")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key] = value
    return options
