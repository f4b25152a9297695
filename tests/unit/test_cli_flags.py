"""Every flag of every subcommand reaches what the command runs: a flag parsed and dropped fails here.

The walk is generic: each subcommand's parser is read, every flag given a value of its type
(not its default), and the command's invocation (handler and keywords) checked: the value
arrives, the handler takes it and reads it, and a pipeline step's options reach the task
functions the step calls.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from recsketch import cli, stages
from recsketch.config import Settings
from recsketch.timestamps import parse_utc

WHEN = "2026-02-03T04:05:06Z"
SETTINGS_VALUES = {"backbone": "vgg16", "top_k": 7, "min_likes": 3, "chunk_size": 9}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _argv_for(action: argparse.Action) -> tuple[list[str], Any]:
    """Tokens that set ``action`` to a value other than its default, and that value as parsed."""
    flag = action.option_strings[0] if action.option_strings else None
    if isinstance(action, argparse._StoreTrueAction):
        return [flag], True  # type: ignore[list-item]
    if action.dest in SETTINGS_VALUES:
        value: Any = SETTINGS_VALUES[action.dest]
        raw = str(value)
    elif action.choices:
        value = raw = next(c for c in action.choices if c != action.default)
    elif action.type is parse_utc:
        raw, value = WHEN, parse_utc(WHEN)
    elif action.type in (int, cli._positive, cli._port):
        raw, value = "7", 7
    elif action.type in (float, cli._rate):
        raw, value = "0.25", 0.25
    elif action.type is Path:
        raw, value = "some/folder", Path("some/folder")
    else:
        raw = value = f"value-of-{action.dest}"
    if isinstance(action, argparse._AppendAction):
        value = [value]
    return ([flag, raw] if flag else [raw]), value


def _walk() -> list[tuple[str, list[str], dict[str, Any]]]:
    """(command, argv, {dest: expected value}) for every subcommand, every flag set."""
    walked = []
    for name, sub in _subparsers(cli.build_parser()).items():
        argv, expected = [name], {}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            tokens, value = _argv_for(action)
            argv += tokens
            expected[action.dest] = value
        walked.append((name, argv, expected))
    return walked


def _reads(function: Any, name: str) -> bool:
    """Whether ``function``'s body reads the name (a parameter nobody reads is a dropped flag)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0]
    assert isinstance(body, ast.FunctionDef)
    return any(isinstance(node, ast.Name) and node.id == name for stmt in body.body for node in ast.walk(stmt))


@pytest.mark.parametrize(("command", "argv", "expected"), _walk(), ids=[w[0] for w in _walk()])
def test_every_flag_reaches_the_command(command: str, argv: list[str], expected: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECSKETCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RECSKETCH_VGG16_WEIGHTS", "random")
    args = cli.build_parser().parse_args(argv)
    handler, kwargs = cli.invocation(args)
    settings = kwargs.get("settings")
    for dest, value in expected.items():
        if dest in SETTINGS_VALUES and dest not in kwargs:
            assert isinstance(settings, Settings) and getattr(settings, dest) == value, (command, dest)
        else:
            assert kwargs.get(dest) == value, (command, dest, kwargs.get(dest))
    bound = inspect.signature(handler).bind(**kwargs)  # the handler takes every keyword
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(handler).parameters.values())
    for name in bound.arguments:
        if name != "options":
            assert _reads(handler, name), f"{command}: {handler.__name__} never reads {name}"
    if takes_any:  # a pipeline step (or run): its options go on to the tasks it calls
        parts = [stages.step(command)] if command != "run" else list(stages.STEPS)
        for dest in set(kwargs) - {"settings", "run_id"}:
            takers = [task for part in parts for task in (part.finish, part.plan) if task is not None
                      and dest in inspect.signature(task.resolve()).parameters]
            consumed = any(part.ids_option == dest for part in parts)
            assert takers or consumed, f"{command}: no task of its steps takes {dest}"


def test_run_takes_every_option_of_its_steps_but_the_mapped_ids() -> None:
    run = _subparsers(cli.build_parser())["run"]
    dests = {a.dest for a in run._actions}
    assert {"published_since", "published_before", "force"} <= dests and "chunk" not in dests


def test_run_pipeline_refuses_an_option_no_step_takes(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="published_after"):
        stages.run_pipeline(Settings(data_dir=tmp_path), published_after=datetime.now(UTC))


def test_the_help_of_every_argument_is_plain_text() -> None:
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help text"
            assert "``" not in action.help and ":func:" not in action.help, (name, action.dest)
