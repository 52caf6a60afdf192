"""``fastdiff SUBCOMMAND``: every subcommand's bad input is one line on stderr, exit 2."""

import pytest

from fastdiff import cli

BAD = {
    "train": ["e99"],
    "study": ["e99"],
    "report": ["/no/such/run"],
    "eval": ["/no/such/run"],
    "curvature": ["/no/such/run"],
    "prepare": ["pets", "--src", "/no/such/folder", "--out", "/tmp/fastdiff-never"],
    "config": ["e99"],
    "cards": ["--all"],
    "calibrate": ["--reps", "0"],
    "env": ["extra"],
}


def test_every_subcommand_has_a_bad_input_case():
    assert set(BAD) == set(cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_on_stderr(name, capsys):
    try:
        code = cli.main([name, *BAD[name]])
    except SystemExit as exit_:  # argparse's error path (fastdiff.errors.Parser)
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("fastdiff: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err


def test_a_subcommands_help_names_the_command_typed(capsys, monkeypatch):
    from fastdiff import errors

    monkeypatch.setattr(errors, "PROG", None)
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    assert capsys.readouterr().out.startswith("usage: fastdiff study")


def test_no_command_prints_the_commands_and_fails(capsys):
    assert cli.main([]) == 2
    assert "fastdiff study e9" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2


def test_cards_lists_the_shipped_cards(capsys):
    assert cli.main(["cards"]) == 0
    out = capsys.readouterr().out
    assert "e9 " in out and "MS1-e9" in out and "e10-gamma" in out


def test_env_names_what_a_bug_report_needs(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for word in ("python", "torch", "triton", "cpu", "cuda"):
        assert word in out
