"""``fastdiff``: one command for every part, as subcommands.

    fastdiff train e9b train.total_steps=200
    fastdiff study e9 data=digits --seeds 3
    fastdiff report runs/study/e9-1a2b3c4d5e
    fastdiff cards

Each subcommand is the module's own entry point (``python -m fastdiff.train`` and
``accelerate launch -m fastdiff.train`` keep working); this only dispatches, so a
subcommand's flags, help and errors are the module's.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

from fastdiff import errors
from fastdiff.errors import fail, guarded

# name: (module with main(argv), one line of what it does, one real invocation)
COMMANDS = {
    "train": ("fastdiff.train", "train one arm", "fastdiff train e9b train.total_steps=200"),
    "study": (
        "fastdiff.study",
        "every arm of a card for every seed, then the report",
        "fastdiff study e9 data=digits train.total_steps=60 --seeds 3",
    ),
    "report": (
        "fastdiff.report_cli",
        "plots and verdicts of a study or of runs",
        "fastdiff report runs/study/e9-1a2b3c4d5e",
    ),
    "eval": (
        "fastdiff.eval",
        "FID/KID of a checkpoint's EMA weights",
        "fastdiff eval runs/e9b/RUN --nfe 50 --samples 10000",
    ),
    "curvature": (
        "fastdiff.curvature_cli",
        "Hutchinson trace of a checkpoint",
        "fastdiff curvature runs/e9b/RUN --probes 64",
    ),
    "prepare": (
        "fastdiff.data.prepare",
        "image data to WebDataset shards",
        "fastdiff prepare cifar10 --src cifar-10-python.tar.gz --out data/cifar10",
    ),
    "config": ("fastdiff.cli", "print an experiment's resolved config", "fastdiff config e9b"),
    "cards": ("fastdiff.cli", "list the shipped experiment cards", "fastdiff cards"),
    "calibrate": (
        "fastdiff.calibrate_cli",
        "the verdicts' error rates on simulated studies",
        "fastdiff calibrate --reps 200",
    ),
    "env": (
        "fastdiff.cli",
        "what a bug report needs: versions, devices, CPU features",
        "fastdiff env",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"  {name:<{width}}  {what:<52} {example}" for name, (_, what, example) in COMMANDS.items()
    ]
    return (
        "usage: fastdiff COMMAND [ARGS ...]   (fastdiff COMMAND --help for its own)\n\n"
        "Diffusion ablations with verdicts you can defend.\n\ncommands:\n" + "\n".join(lines)
    )


def cards() -> int:
    from fastdiff.cards import load_card, shipped

    for path in shipped():
        card = load_card(path)
        arms = ", ".join(card.arms)
        print(
            f"{card.name:<10} {card.title}\n{'':<10} arms {arms} (baseline {card.baseline}); {path}"
        )
    return 0


def config(argv: list[str]) -> int:
    """An experiment's resolved config; with no arguments, the experiments (each a file)."""
    if not argv:
        from fastdiff.config import experiments_table

        print(experiments_table())
        print("\nfastdiff config NAME [KEY=VALUE ...]: one experiment's resolved config")
        return 0
    from fastdiff.train import main as train_main

    return train_main([*argv, "--cfg", "job"])


def cpu_features() -> tuple[str, list[str]]:
    """The CPU model and the matrix features fastdiff's speed depends on (AMX, AVX512-BF16)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    return model, [f for f in wanted if f in flags]


def env() -> int:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    packages = ["fastdiff", "torch", "triton", "accelerate", "webdataset", "torch-fidelity"]
    packages += ["hydra-core", "hydra-zen", "numpy"]
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"platform     {platform.platform()}")
    for name in packages:
        print(f"{name:<14} {ver(name)}")
    model, features = cpu_features()
    print(f"cpu          {model}; {os.cpu_count()} cores; {', '.join(features) or 'no AMX/AVX512'}")
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i}       {p.name}, {p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}"
            )
        print(f"cuda         {torch.version.cuda}; triton runs compiled kernels")
    else:
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        print(
            "cuda         none; Triton kernels run "
            + (
                "in the interpreter (TRITON_INTERPRET=1)"
                if interp
                else "nowhere: torch reference ops"
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else fail("no command given: see the list above")
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return fail(f"unknown command {name!r}: use one of {', '.join(COMMANDS)} (fastdiff --help)")
    if name in ("cards", "env") and rest:
        return fail(f"fastdiff {name} takes no arguments, got {' '.join(rest)}")
    if name == "cards":
        return guarded(cards)
    if name == "env":
        return env()
    if name == "config":
        return config(rest)
    errors.PROG = f"fastdiff {name}"
    try:
        return importlib.import_module(COMMANDS[name][0]).main(rest)
    except BrokenPipeError:  # `fastdiff calibrate | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        errors.PROG = None


if __name__ == "__main__":
    sys.exit(main())
