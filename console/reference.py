"""The CLI reference, generated from the parser itself (the docs' CLI page and the tests that
every command and option says what it does read it), so it cannot drift from the code."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Option:
    flags: str
    help: str
    default: str | None
    choices: str | None


@dataclass
class Command:
    path: str  # "pgdispatch dead retry"
    help: str
    usage: str
    options: list[Option] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _default(action: argparse.Action) -> str | None:
    if action.default in (None, False, argparse.SUPPRESS, [], ()) or isinstance(action, argparse._HelpAction):
        return None
    if isinstance(action.default, tuple) and len(action.default) == 2:
        return ":".join(str(part) for part in action.default)  # --bind's (host, port)
    return str(action.default)


def walk(parser: argparse.ArgumentParser, path: str = "pgdispatch", text: str = "") -> Command:
    command = Command(path=path, help=text or (parser.description or ""),
                      usage=" ".join(parser.format_usage().split())[len("usage: "):])
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction | argparse._VersionAction):
            continue
        flags = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if isinstance(flags, tuple):
            flags = " ".join(flags)
        choices = ", ".join(str(c) for c in action.choices) if action.choices else None
        command.options.append(Option(str(flags), action.help or "", _default(action), choices))
    for name, help_text, sub in _subparsers(parser):
        command.commands.append(walk(sub, f"{path} {name}", help_text))
    return command


def every(command: Command) -> Iterator[Command]:
    yield command
    for sub in command.commands:
        yield from every(sub)


def markdown(root: Command) -> str:
    """One section per command, its options in a table with their defaults."""
    lines: list[str] = []
    for command in every(root):
        if command is root:
            continue
        depth = command.path.count(" ")
        lines.append(f"{'#' * min(depth + 1, 4)} `{command.path}`\n")
        if command.help:
            lines.append(command.help.strip() + "\n")
        lines.append(f"```\n{command.usage}\n```\n")
        if command.options:
            lines.append("| option | what it does | default |\n|---|---|---|")
            for option in command.options:
                what = option.help.replace("|", "\\|").replace("%%", "%")
                if option.choices:
                    what += f" (one of: {option.choices})"
                lines.append(f"| `{option.flags}` | {what} | {option.default or ''} |")
            lines.append("")
    return "\n".join(lines)
