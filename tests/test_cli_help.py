"""`asgi-worker --help`: each command's summary is whole, at 80 columns and at 64."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from asgi_worker.cli.commands import main


@pytest.mark.parametrize("width", [80, 64])
def test_help_shows_each_commands_summary_whole(width: int) -> None:
    result = CliRunner().invoke(main, ["--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:\n")[1]
    assert "..." not in commands  # Click's mark of a summary cut to fit
    listed = dict(line.split(maxsplit=1) for line in commands.splitlines() if line.strip())
    assert listed == {name: command.short_help for name, command in main.commands.items()}
    assert all(len(line) <= width for line in result.output.splitlines())
