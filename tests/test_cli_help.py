"""`deepsim-rt --help` (issue 11 defect 11): fast (no torch import), lists every command as the full parser does,
every option has help and shows its default, no docstring markup in the help text."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from deepsim_rt.cli import SUBCOMMAND_MODULES, build_parser, declared_commands, main, polish_help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help for c in action._choices_actions}


def test_top_level_help_imports_no_torch():
    code = ("import sys\nfrom deepsim_rt import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # it was 16-21 s (torch + inductor) under load, now 0.4 s
    assert "register" in proc.stdout and "evaluate-changes" in proc.stdout


def test_lazy_listing_matches_the_full_parser():
    full = build_parser()
    lazy = build_parser(None, lazy=True)
    assert _helps(lazy) == _helps(full)  # every command, same help text, read without importing its module
    assert set(_subparsers(full)) == {c for m in SUBCOMMAND_MODULES for c in declared_commands(m)}
    # a command's own module is imported and its parser is the real one
    only = _subparsers(build_parser("register", lazy=True))
    assert only["register"].get_default("func") is not None and only["train-features"].get_default("func") is None


def test_every_option_has_help_with_its_default_and_no_markup():
    for name, sp in _subparsers(polish_help(build_parser())).items():
        text = sp.format_help()
        assert "`" not in text, f"{name}: docstring markup in its help"
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{name} {a.option_strings}: no help"
            if a.default not in (None, False, argparse.SUPPRESS):
                assert "default" in a.help.lower(), f"{name} {a.option_strings}: default {a.default!r} not shown"


def test_dataclass_docstring_names_become_options():
    sp = _subparsers(polish_help(build_parser()))["study"]
    assert "--full" in sp.description and "full=True" not in sp.description


def test_subcommand_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["register", "--help"])
    assert exc.value.code == 0 and "--moving MOVING" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["regster"])
    assert exc.value.code == 2 and "invalid choice: 'regster'" in capsys.readouterr().err


def test_register_backend_choices_are_the_runtimes():
    from deepsim_rt.register_cli import BACKEND_CHOICES
    from deepsim_rt.runtime import BACKENDS

    assert BACKEND_CHOICES == BACKENDS  # a literal copy so that `register --help` need not import torch
