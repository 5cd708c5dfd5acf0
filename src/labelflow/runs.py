"""Runs: the workflow's unit of training. Every model the workflow trains is a run.

A run is an experiment (the recipe), a dataset table with its class map and image root, the
validation folds, and optionally the weights its first stage starts from. Its results live
under ``results/<run>/`` and the same rules serve every run: ``train_stage``, ``infer``,
``pca_index``, ``evaluate_index``, ``rejection``, ``embed``, ``summary``.

| run name                     | what it is                                             |
|------------------------------|--------------------------------------------------------|
| ``<experiment>``             | a configured experiment on the dataset (``experiments``) |
| ``grid/<id>``                | a grid-search point (``grid.params``)                   |
| ``kfold/<experiment>/fold_<k>`` | fold k validates (``kfold``); the fold the main run   |
|                              | validates on is the main run ``<experiment>`` itself    |
| ``ood/<experiment>``         | trained without the held-out classes (``ood``)          |
| ``autolabel/round_<r>``      | autolabel round r: human + accepted pseudo-labels        |
| ``cleaned/<experiment>``     | trained on the dataset after the ``label_issues`` action |

With config key ``corrections`` set, every run on the main dataset reads the corrected table
``results/data/dataset_corrected.csv`` (:mod:`labelflow.corrections`) instead of
``results/data/dataset.csv``.

Static runs are known when the workflow is parsed; ``ood/…``, ``autolabel/round_…`` and ``cleaned/…`` runs
are made on demand (their experiments are loaded only when a job needs them, so an unused
``ood`` or ``autolabel`` section never breaks the default workflow). A new kind of run is a
new entry in :meth:`RunTable.from_config`.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class GridError(ValueError):
    """A grid key or value that does not fit the experiment; names the key."""


def set_dotted(experiment: dict[str, Any], key: str, value: Any) -> None:
    """experiment["stages"]["stage1"]["lr"] = value for key "stages.stage1.lr".

    Every component must already exist (the experiment has been validated with defaults
    filled in), so a misspelt key fails here instead of being silently added.
    """
    node: Any = experiment
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            raise GridError(f"grid key {key!r}: {'.'.join(parts[:depth])} is a list; grid keys address mappings")
        if not isinstance(node, dict) or part not in node:
            known = sorted(node) if isinstance(node, dict) else []
            raise GridError(
                f"grid key {key!r}: {'.'.join(parts[: depth + 1])!r} is not in the experiment; "
                f"known keys there: {known}"
            )
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_").replace(" ", "")


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest distinct dotted suffix of each key: stages.stage1.lr → stage1.lr if needed."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            candidate = ".".join(parts[-n:])
            if all(not other.endswith(candidate) or other == key for other in keys):
                names[key] = candidate
                break
    return names


def grid_runs(experiment: dict[str, Any], params: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """Cartesian product of `params` → {"<id>": {"experiment": variant, "values": {key: value}}}.

    Ids are readable and stable (`lr=0.001,embedding_size=64`), in the order of `params`.
    """
    if not params:
        return {}
    for key, values in params.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"grid key {key!r} needs a non-empty list of values")
    keys = list(params)
    names = short_names(keys)
    runs = {}
    for combination in itertools.product(*(params[k] for k in keys)):
        variant = copy.deepcopy(experiment)
        for key, value in zip(keys, combination):
            set_dotted(variant, key, value)
        run_id = ",".join(f"{names[k]}={format_value(v)}" for k, v in zip(keys, combination))
        if run_id in runs:
            raise GridError(f"grid values give the run id {run_id!r} twice; make the values distinct")
        runs[run_id] = {"experiment": variant, "values": dict(zip(keys, combination))}
    return runs


# --------------------------------------------------------------------------- runs

# The first path component of results/ that is not a configured experiment's run.
RESERVED_NAMES = frozenset(
    {"grid", "kfold", "ood", "autolabel", "cleaned", "label_issues", "data", "logs", "benchmarks"}
)
DATASET_TABLE = "results/data/dataset.csv"  # rule split
CORRECTED_TABLE = "results/data/dataset_corrected.csv"  # rule apply_corrections
CLEANED_TABLE = "results/label_issues/dataset.csv"  # rule label_issues_dataset


def main_table(config: Mapping[str, Any]) -> str:
    """The table every run on the main dataset trains on: the corrected one when config key
    ``corrections`` names a file of human corrections."""
    return CORRECTED_TABLE if config.get("corrections") else DATASET_TABLE
NAME_PATTERN = r"[A-Za-z0-9_.-]+"


class RunError(ValueError):
    """A run that cannot be made from the config; names the config key."""


@dataclass(frozen=True)
class RunData:
    """The images a run trains and validates on."""

    table: str  # dataset.csv: path,tag,class,fold
    tag2cls: str  # tag2cls.json
    root: str  # folder the table's paths are relative to


@dataclass(frozen=True)
class Run:
    name: str
    experiment: dict[str, Any]
    data: RunData
    valid_folds: tuple[int, ...]
    init: str | None = None  # weights the first stage starts from (autolabel warm start)
    calibration_share: float = 0.0  # of the validation fold, held out from checkpoint selection

    @property
    def stages(self) -> list[str]:
        return list(self.experiment["stages"])

    @property
    def final_stage(self) -> str:
        return self.stages[-1]

    def path(self, *parts: str) -> str:
        return "/".join(("results", self.name, *parts))

    def checkpoint(self, stage: str | None = None) -> str:
        """best.pt of ``stage`` (default: the final stage)."""
        return self.path(stage or self.final_stage, "best.pt")

    def stage_inputs(self, stage: str) -> dict[str, str]:
        """The files a stage (training or the LR finder) reads: the run's data, and the weights it
        starts from (the previous stage's best; the run's init for the first stage)."""
        if stage not in self.stages:
            raise RunError(f"run {self.name!r} has no stage {stage!r}; stages: {self.stages}")
        inputs = {"dataset": self.data.table, "tag2cls": self.data.tag2cls, "root": self.data.root}
        position = self.stages.index(stage)
        start = self.checkpoint(self.stages[position - 1]) if position > 0 else self.init
        if start is not None:
            inputs["init"] = start
        return inputs

    def lr_suggestion(self, stage: str) -> str | None:
        """The LR finder's suggestion a stage with ``lr: auto`` trains with (None otherwise)."""
        if self.experiment["stages"][stage]["lr"] == "auto":
            return self.path("lrfinder", stage, "suggestion.json")
        return None


def round_recipe(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment as it trains an autolabel round: no top-k checkpoint copies. A round's
    model is used once, through best.pt; the copies would add ~230 MB per round of a 10-round
    digits run and nothing reads them. The experiment itself is not changed."""
    stages = {stage: {**spec, "top_k": 0} for stage, spec in experiment["stages"].items()}
    return {**experiment, "stages": stages}


@dataclass
class RunTable:
    """Every run of a workflow: the static ones by name, the others made on demand by family."""

    static: dict[str, Run]
    families: dict[str, Callable[[re.Match], Run]] = field(default_factory=dict)  # regex -> factory
    grid: dict[str, dict[str, Any]] = field(default_factory=dict)  # grid id -> experiment, values
    kfold: dict[str, list[Run]] = field(default_factory=dict)  # experiment -> its fold runs, fold 0 first
    _made: dict[str, Run] = field(default_factory=dict, repr=False)  # on-demand runs, made once

    def kfold_runs(self, experiment: str) -> list[Run]:
        """The k-fold runs of ``experiment``, fold 0 first."""
        return list(self.kfold.get(experiment, []))

    def __getitem__(self, name: str) -> Run:
        if name in self.static:
            return self.static[name]
        if name in self._made:
            return self._made[name]
        for pattern, make in self.families.items():
            match = re.fullmatch(pattern, name)
            if match:
                self._made[name] = make(match)
                return self._made[name]
        raise RunError(f"no run named {name!r}; runs: {sorted(self.static)} and {sorted(self.families)}")

    def names_pattern(self) -> str:
        """A regex matching every run name (Snakemake's ``run`` wildcard constraint)."""
        names = [re.escape(name) for name in self.static] + list(self.families)
        return "|".join(names) or "(?!)"

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        load_experiment: Callable[[str], dict[str, Any]],
        *,
        validate_experiment: Callable[[dict[str, Any], str], None],
        valid_folds: Sequence[int],
    ) -> RunTable:
        """The runs of a validated config; ``load_experiment(name)`` reads and validates an
        experiment file, ``validate_experiment(experiment, what)`` validates a derived one (a grid
        point) and raises an error naming ``what``."""
        folds = tuple(valid_folds)
        share = config["calibration"]["holdout"]
        main = RunData(main_table(config), "results/data/tag2cls.json", config["dataset"])
        check_names(config["experiments"])
        static = {name: Run(name, load_experiment(name), main, folds, None, share) for name in config["experiments"]}
        grid = _grid(config, load_experiment, validate_experiment)
        static.update({f"grid/{i}": Run(f"grid/{i}", point["experiment"], main, folds, None, share) for i, point in grid.items()})
        kfold: dict[str, list[Run]] = {}
        for name in config["kfold"]["experiments"] or config["experiments"][:1]:
            experiment = static[name].experiment if name in static else load_experiment(name)
            kfold[name] = []
            for k in range(config["n_folds"]):
                if name in config["experiments"] and folds == (k,):
                    # Same recipe, data, validation fold and seed as the main run: the same model,
                    # bit for bit, so the main run serves as this fold instead of training it twice.
                    kfold[name].append(static[name])
                    continue
                static[f"kfold/{name}/fold_{k}"] = Run(f"kfold/{name}/fold_{k}", experiment, main, (k,), None, share)
                kfold[name].append(static[f"kfold/{name}/fold_{k}"])

        ood_data = RunData("results/ood/data/dataset.csv", "results/ood/data/tag2cls.json", config["dataset"])

        def load_for(key: str, name: str) -> dict[str, Any]:
            try:
                return load_experiment(name)
            except Exception as exc:  # the loader's own error, with the key that named the file
                raise RunError(f"config key `{key}`: {exc}") from None

        def ood_run(match: re.Match) -> Run:
            return Run(match.group(0), load_for("ood.experiment", match.group(1)), ood_data, folds, None, share)

        def autolabel_run(match: re.Match) -> Run:
            round_ = int(match.group(1))
            recipe = round_recipe(load_for("autolabel.experiment", config["autolabel"]["experiment"]))
            data = RunData(f"results/autolabel/round_{round_}/dataset.csv", AUTOLABEL_TAG2CLS, AUTOLABEL_ROOT)
            previous = f"autolabel/round_{round_ - 1}/{list(recipe['stages'])[-1]}/best.pt"
            init = f"results/{previous}" if config["autolabel"]["warm_start"] and round_ > 0 else None
            return Run(match.group(0), recipe, data, folds, init, share)

        cleaned_data = RunData(CLEANED_TABLE, main.tag2cls, main.root)

        def cleaned_run(match: re.Match) -> Run:
            return Run(match.group(0), load_for("label_issues.experiment", match.group(1)), cleaned_data, folds, None, share)

        families = {
            rf"ood/({NAME_PATTERN})": ood_run,
            r"autolabel/round_(\d+)": autolabel_run,
            rf"cleaned/({NAME_PATTERN})": cleaned_run,
        }
        return cls(static, families, grid, kfold)


AUTOLABEL_DATA = "results/autolabel/data"
AUTOLABEL_TAG2CLS = f"{AUTOLABEL_DATA}/tag2cls.json"
AUTOLABEL_ROOT = "results/autolabel/root"


def check_names(experiments: Sequence[str]) -> None:
    reserved = sorted(set(experiments) & RESERVED_NAMES)
    if reserved:
        raise RunError(
            f"config key `experiments`: {reserved} name folders of results/ that hold other runs "
            f"({sorted(RESERVED_NAMES)}); rename the experiment file"
        )


def _grid(config, load_experiment, validate_experiment) -> dict[str, dict[str, Any]]:
    """The grid's points by id: {"experiment": variant, "values": {key: value}}."""
    params = config["grid"]["params"]
    if not params:
        return {}
    name = config["grid"]["experiment"] or config["experiments"][0]
    try:
        runs = grid_runs(load_experiment(name), params)
    except GridError as exc:
        raise RunError(f"config key `grid.params`: {exc}") from None
    for run_id, run in runs.items():
        validate_experiment(run["experiment"], f"config key `grid.params`: run {run_id}")
    return runs
