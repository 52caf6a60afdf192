"""Experiment cards as files: a study's question, its arms and the criteria that answer it.

    configs/cards/ms1_e9.yaml:
        name: e9
        title: MS1-e9 — Min-SNR vs vanilla ε-MSE under cosine β
        baseline: e9a
        arms: {e9a: [experiment=e9a], e9b: [experiment=e9b]}
        seeds: [1077]
        criteria:
          - {kind: fid_ratio, which: final, band: 1.3, pathology: 2.0, source: card}

An arm is an experiment and Hydra overrides; the criteria are kinds from the report's
library (:data:`fastdiff.report.criteria.KINDS`) with their parameters, each marked
``source: card`` (written on the card) or ``source: rule`` (fastdiff's reading where the
card is silent). A card is found by its ``name``, its file name, or a path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from fastdiff.config import compose, renamed
from fastdiff.errors import ConfigError
from fastdiff.report.criteria import KINDS
from fastdiff.report.runs import NOT_COMPARED, settings

# The shipped cards: configs/cards in a checkout, fastdiff/shipped_configs/cards in a wheel.
CARD_DIRS = [
    Path(__file__).resolve().parent.parent / "configs" / "cards",
    Path(__file__).resolve().parent / "shipped_configs" / "cards",
]
SOURCES = ("card", "rule")


@dataclass
class CriterionSpec:
    kind: str
    source: str
    params: dict = field(default_factory=dict)


@dataclass
class Card:
    name: str
    title: str
    baseline: str
    arms: dict[str, list[str]]
    criteria: list[CriterionSpec]
    seeds: list[int] = field(default_factory=lambda: [1077])
    question: str = ""
    notes: str = ""
    path: Path | None = None

    @property
    def treatments(self) -> list[str]:
        return [a for a in self.arms if a != self.baseline]

    @cached_property
    def resolved(self) -> dict[str, dict]:
        """Each arm's composed config, flattened ({"loss.weighting": ...})."""
        out = {}
        for arm, overrides in self.arms.items():
            node = OmegaConf.to_container(compose(list(overrides)))
            out[arm] = settings(node)
        return out

    @cached_property
    def varied(self) -> set[str]:
        """The config keys the card's arms differ in: all a matched pair may differ in."""
        flat = list(self.resolved.values())
        keys = set().union(*flat) - NOT_COMPARED
        return {k for k in keys if any(f.get(k) != flat[0].get(k) for f in flat)}

    def arm_of(self, config: dict) -> str | None:
        """The arm a run's config belongs to: its experiment and the varied keys."""
        flat = settings(config)
        for arm in self.arms:
            mine = self.resolved[arm]
            if flat.get("experiment") != mine.get("experiment"):
                continue
            if all(_same(flat.get(k), mine.get(k)) for k in self.varied | self.set_by(arm)):
                return arm
        return None

    def set_by(self, arm: str) -> set[str]:
        """The settings ``arm``'s overrides name (``loss.prediction=v``: loss.prediction),
        as the resolved config spells them: a run is the arm's only if it has them too."""
        keys = {renamed([o])[0].split("=", 1)[0].lstrip("+~") for o in self.arms[arm]}
        return {k for k in keys if "." in k} & set(self.resolved[arm])

    def run_overrides(self, arm: str, overrides: list[str], *, seed: int, root: Path) -> list[str]:
        """The settings of ``arm``'s run for ``seed`` in the study folder ``root``: the arm's
        overrides, the study's, and the run's seed and directory (resumed when it exists)."""
        return [
            *self.arms[arm],
            *overrides,
            f"train.seed={seed}",
            f"train.run_dir={root / arm / f'seed{seed}'}",
            "train.resume=auto",
        ]

    def as_yaml(self) -> str:
        node = {
            "name": self.name,
            "title": self.title,
            "question": self.question,
            "baseline": self.baseline,
            "arms": self.arms,
            "seeds": self.seeds,
            "criteria": [{"kind": c.kind, **c.params, "source": c.source} for c in self.criteria],
        }
        if self.notes:
            node["notes"] = self.notes
        return yaml.safe_dump(node, sort_keys=False, allow_unicode=True)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def shipped() -> list[Path]:
    """The card files that come with fastdiff."""
    for folder in CARD_DIRS:
        if folder.is_dir():
            return sorted(folder.glob("*.yaml"))
    return []


def detect_card(runs) -> Card | None:
    """The shipped card every one of whose arms has runs here (None: no such card)."""
    for path in shipped():
        card = load_card(path)
        found = {card.arm_of(r.config) for r in runs}
        if set(card.arms) <= found:
            return card
    return None


def find_card(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(f"card file {path} not found: pass an existing card YAML")
        return path
    for file in shipped():
        if file.stem == str(name_or_path) or _peek_name(file) == str(name_or_path):
            return file
    names = ", ".join(_peek_name(f) or f.stem for f in shipped())
    raise ConfigError(f"unknown card {name_or_path!r}: use one of {names}, or a card file's path")


def _peek_name(file: Path) -> str | None:
    try:
        node = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None
    return node.get("name") if isinstance(node, dict) else None


def load_card(name_or_path: str | Path) -> Card:
    """A card by name or path, checked: one line for anything wrong."""
    path = find_card(name_or_path)
    try:
        node = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"card {path} is not valid YAML{where}") from None
    return card_from(node, path)


def card_from(node, path: Path | None = None) -> Card:
    where = f"card {path}" if path else "card"
    if not isinstance(node, dict):
        raise ConfigError(f"{where} must be a mapping with name, baseline, arms and criteria")
    for key in ("name", "baseline", "arms", "criteria"):
        if key not in node:
            raise ConfigError(f"{where} has no {key!r}")
    arms = node["arms"]
    if not isinstance(arms, dict) or len(arms) < 2:
        raise ConfigError(f"{where}: arms must map at least two arm names to override lists")
    for arm, overrides in arms.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}: arm {arm!r} must be a list of overrides (key=value)")
        if not any(o.startswith("experiment=") for o in overrides):
            raise ConfigError(f"{where}: arm {arm!r} names no experiment= (e.g. experiment=e9a)")
    if node["baseline"] not in arms:
        raise ConfigError(f"{where}: baseline {node['baseline']!r} is not one of its arms")
    specs = []
    for i, entry in enumerate(node["criteria"] or []):
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ConfigError(f"{where}: criterion {i + 1} needs a kind")
        entry = dict(entry)
        kind, source = entry.pop("kind"), entry.pop("source", "card")
        if kind not in KINDS:
            raise ConfigError(
                f"{where}: criterion {i + 1} has unknown kind {kind!r}: use one of "
                f"{', '.join(KINDS)}"
            )
        if source not in SOURCES:
            raise ConfigError(f"{where}: criterion {i + 1}'s source must be card or rule")
        KINDS[kind].check(entry, f"{where}: criterion {i + 1} ({kind})")
        specs.append(CriterionSpec(kind, source, entry))
    if not specs:
        raise ConfigError(f"{where} has no criteria")
    seeds = node.get("seeds", [1077])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a list of whole numbers")
    return Card(
        name=str(node["name"]),
        title=str(node.get("title", node["name"])),
        baseline=node["baseline"],
        arms={a: list(o) for a, o in arms.items()},
        criteria=specs,
        seeds=seeds,
        question=str(node.get("question", "")),
        notes=str(node.get("notes", "")),
        path=path,
    )
