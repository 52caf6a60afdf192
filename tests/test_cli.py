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


def _runs(tmp_path, count):
    from tests.test_report import make_run

    arms = [("e9a", "uniform"), ("e9b", "minsnr")]
    return [
        str(make_run(tmp_path / "runs" / name, name, weighting, "cosine", final_fid=10.0).path)
        for name, weighting in arms[:count]
    ]


def test_a_report_of_several_runs_goes_to_dot_report_not_into_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = _runs(tmp_path, 2)
    for _ in range(2):  # and again, over its own earlier report
        assert cli.main(["report", *runs]) == 0
        assert (tmp_path / "report" / "REPORT.md").is_file()
        assert not list((tmp_path / "runs").glob("*/report"))
    assert "wrote report/REPORT.md" in capsys.readouterr().out


def test_a_report_refuses_a_dot_report_that_is_not_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = _runs(tmp_path, 2)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.txt").write_text("mine")
    assert cli.main(["report", *runs]) == 2
    err = capsys.readouterr().err
    assert "pass --out DIR" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["notes.txt"]
    assert cli.main(["report", *runs, "--out", "there"]) == 0  # --out never looks at ./report


def test_a_report_of_one_run_is_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (run,) = _runs(tmp_path, 1)
    assert cli.main(["report", run]) == 0
    assert (tmp_path / "runs" / "e9a" / "report" / "REPORT.md").is_file()
    assert not (tmp_path / "report").exists()


def test_python_dash_m_fastdiff_report_is_the_report_command():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fastdiff.report", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m fastdiff.report")
    assert "./report" in " ".join(done.stdout.split())


def test_config_without_a_name_lists_the_experiments_and_their_files(capsys):
    from fastdiff.config import EXPERIMENT_FILES, EXPERIMENTS

    assert cli.main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, (desc, _) in EXPERIMENTS.items():
        at = lines.index(next(line for line in lines if line.startswith(f"{name} ")))
        assert lines[at].endswith(desc) and lines[at + 1].strip() == EXPERIMENT_FILES[name]
