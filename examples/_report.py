"""Plain-text tables the examples print: per seed, the mean over seeds, and seed counts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def print_table(title: str, rows: list[tuple[str, list[float]]], columns: list[str]) -> None:
    """One row per quantity, one column per case.

    Example:
        >>> print_table("T", [("loss", [1.0, 2.5])], ["a", "b"])
        <BLANKLINE>
        T
                                                         a               b
        loss                                             1             2.5
    """
    width = max(16, *(len(c) + 2 for c in columns))
    print(f"\n{title}")
    print(f"{'':<34}" + "".join(f"{c:>{width}}" for c in columns))
    for name, values in rows:
        print(f"{name:<34}" + "".join(f"{v:>{width}.5g}" for v in values))


def report_seeds(
    per_seed: dict[str, list[dict[str, float]]],
    columns: list[str],
    setup: str,
    counted: list[str],
    question: str,
    wins: Callable[[float, float], bool],
) -> dict[str, dict[str, float]]:
    """Print each seed's table, the mean over seeds and, for the ``counted`` columns, in how many seeds
    ``wins(value, first column's value)`` holds; return the means.

    Example:
        >>> means = report_seeds({"a": [{"x": 1.0}], "b": [{"x": 3.0}]}, ["a", "b"], "toy", ["b"], "?",
        ...                      lambda v, ref: v > ref)  # doctest: +ELLIPSIS
        <BLANKLINE>
        Seed 0 (toy)
        ...
        >>> means["b"]["x"]
        3.0
    """
    keys = list(per_seed[columns[0]][0])
    seeds = len(per_seed[columns[0]])
    for seed in range(seeds):
        print_table(f"Seed {seed} ({setup})", [(k, [per_seed[c][seed][k] for c in columns]) for k in keys], columns)
    means = {c: {k: float(np.mean([m[k] for m in per_seed[c]])) for k in keys} for c in columns}
    if seeds > 1:
        print_table(f"Mean over {seeds} seeds", [(k, [means[c][k] for c in columns]) for k in keys], columns)
        counts = [
            (
                k,
                [
                    float(sum(wins(per_seed[c][i][k], per_seed[columns[0]][i][k]) for i in range(seeds)))
                    for c in counted
                ],
            )
            for k in keys
            if not k.startswith("seconds")
        ]
        print_table(f"Seeds (of {seeds}) where {question}", counts, counted)
    return means
