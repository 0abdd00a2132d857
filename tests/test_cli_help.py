"""`moeprune -h` and every `moeprune COMMAND -h`: an example, a help string for every argument, shown defaults.

The parser is walked from `build_parser()` (nested commands too: `stats merge`, `testbed build|info|path`); the
list of commands a user should find is written out here, so a command dropped from the CLI is noticed."""

from __future__ import annotations

import argparse

import pytest

from moeprune.cli import build_parser

COMMANDS = ("demo", "info", "analyze", "calibrate", "stats", "criteria", "plan", "apply", "prune", "quantize",
            "budget", "verify", "eval", "compare", "gen-tasks", "lm-eval", "export", "steer", "sweep", "taskpack",
            "testbed")
NESTED = {"stats": ("merge",), "testbed": ("build", "info", "path"), "export": ("gguf",),
          "taskpack": ("build", "export")}


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every subcommand parser below `parser`, by its full name ("prune", "stats merge", ...)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix}{name}"
                out[full] = sub
                out.update(_subcommands(sub, full + " "))
    return out


PARSER = build_parser()
SUBCOMMANDS = _subcommands(PARSER)


def _flat(text: str) -> str:
    """Help text without whitespace: argparse wraps lines (also after hyphens) wherever the width ends."""
    return "".join(text.split())


def _shown(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line argparse prints for `action` (defaults filled in by the parser's formatter)."""
    return parser._get_formatter()._expand_help(action)


def test_the_walk_finds_every_command():
    expected = set(COMMANDS) | {f"{group} {name}" for group, names in NESTED.items() for name in names}
    assert set(SUBCOMMANDS) == expected


def test_top_level_help_names_every_command_without_jargon():
    text = PARSER.format_help()
    description = PARSER.description or ""
    assert "Mixture-of-Experts" in description
    assert "api argument" not in text.lower() and "namespace" not in text.lower()
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed, set(COMMANDS) - listed
    assert "analyze" in listed


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_command_has_an_example(name):
    text = SUBCOMMANDS[name].format_help()
    assert "example:" in text
    assert "moeprune " in text.split("example:", 1)[1]


@pytest.mark.parametrize("name", ["(top level)", *sorted(SUBCOMMANDS)])
def test_every_argument_has_help(name):
    parser = PARSER if name == "(top level)" else SUBCOMMANDS[name]
    missing = [a.option_strings or a.dest or a.metavar for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help != argparse.SUPPRESS)]
    assert not missing, f"moeprune {name}: no help for {missing}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_defaults_are_shown(name):
    parser = SUBCOMMANDS[name]
    text = _flat(parser.format_help())
    for action in parser._actions:
        if action.default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        shown = _shown(parser, action)
        assert str(action.default) in shown, f"moeprune {name} {action.option_strings}: {shown!r}"
        assert _flat(shown) in text


def test_prune_shows_calibration_defaults():
    text = _flat(SUBCOMMANDS["prune"].format_help())
    for needle in ("(default: 128)", "(default: 512)", "(default: 5GB)", "(default: float32)"):
        assert _flat(needle) in text, needle


@pytest.mark.parametrize("name", ["prune", "plan"])
def test_ratio_help_names_experts_and_neurons(name):
    action = next(a for a in SUBCOMMANDS[name]._actions if "--ratio" in a.option_strings)
    assert "experts" in action.help and ("neurons" in action.help or "parameters" in action.help), action.help
