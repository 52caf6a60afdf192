"""The README is a front door: one screen per idea, and every command in it parses."""

import re
import shlex
from pathlib import Path

from fastdiff import cli
from fastdiff.cards import load_card
from fastdiff.config import compose
from fastdiff.train import parse_args

README = Path(__file__).resolve().parents[1] / "README.md"


def commands() -> list[list[str]]:
    """Every `fastdiff …` command in the README's code blocks and command table."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    lines += re.findall(r"^\| `(fastdiff [^`]+)` \|", text, flags=re.M)
    return [shlex.split(line) for line in lines if line.startswith("fastdiff ")]


def test_the_readme_fits_a_front_door():
    assert len(README.read_text().splitlines()) <= 150


def test_every_readme_command_parses():
    found = commands()
    assert len(found) >= 10
    for argv in found:
        name, rest = argv[1], argv[2:]
        assert name in cli.COMMANDS, argv
        if name in ("train", "config"):
            overrides, _ = parse_args(rest)
            compose(overrides)  # Hydra's grammar and the store, not the files named
        elif name == "study":
            card = load_card(rest[0])
            overrides = [o for o in rest[1:] if "=" in o and not o.startswith("-")]
            for arm in card.arms.values():
                compose([*arm, *overrides])
