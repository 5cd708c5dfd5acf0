"""Runs derived from an experiment: grid-search points and k-fold folds.

A run is an experiment dict plus its validation folds; grid runs are named `grid/<id>`,
k-fold runs `kfold/<experiment>/fold_<k>`, so every rule that serves an experiment serves
them too (one training rule, one training loop).
"""

from __future__ import annotations

import copy
import itertools
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
