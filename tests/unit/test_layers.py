"""The layer contracts of docs/layout.md (pyproject.toml [tool.importlinter]), checked with import-linter: src never
imports evaluation, callbacks or experiments; samplers import neither worlds nor training; the model imports nothing
above it; no import in src points to a higher layer. Function-level imports count too."""

import os

from importlinter import cli as importlinter_cli  # the dev extra

from helpers import ROOT


def test_import_contracts_are_kept(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the root packages are found from the project root
    status = importlinter_cli.lint_imports(config_filename=os.path.join(ROOT, "pyproject.toml"), no_cache=True,
                                           no_logo=True)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 broken" in out
