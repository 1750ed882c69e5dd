"""Choosing one option per weight: a Lagrangian knapsack (size + λ·noise), then single moves to smaller
options while the predicted noise still fits."""

from __future__ import annotations

import numpy as np

from qconvert.mixed.options import Option


def allocate(options: dict[str, list[Option]], budget: float) -> dict[str, Option]:
    """Per weight the option minimising size + λ·noise, with the smallest λ (searched in log space)
    whose total predicted noise fits `budget`; float everywhere if none does."""

    def pick(lam: float) -> dict[str, Option]:
        return {name: min(opts, key=lambda o: (o.size + lam * o.noise, o.noise)) for name, opts in options.items()}

    def fits(lam: float) -> bool:
        return sum(o.noise for o in pick(lam).values()) <= budget

    fitting = next((lam for lam in np.logspace(-3, 30, 331) if fits(lam)), None)  # every 0.1 decade
    if fitting is None:
        return {name: next(o for o in opts if o.method == "float") for name, opts in options.items()}
    low, high = fitting / 10**0.1, fitting
    for _ in range(30):
        mid = float(np.sqrt(low * high))
        low, high = (low, mid) if fits(mid) else (mid, high)
    return _fill(pick(high), options, budget)


def _fill(choice: dict[str, Option], options: dict[str, list[Option]], budget: float) -> dict[str, Option]:
    """Spend what the budget has left: the Lagrangian only reaches plans on the convex hull of size
    against noise, so move single weights to smaller options while the total noise still fits, the
    most bytes saved per noise added first."""
    choice = dict(choice)
    noise = sum(o.noise for o in choice.values())
    while True:
        moves = [
            (name, o)
            for name, current in choice.items()
            for o in options[name]
            if o.size < current.size and noise - current.noise + o.noise <= budget
        ]
        if not moves:
            return choice
        name, option = max(
            moves, key=lambda m: ((choice[m[0]].size - m[1].size) / max(m[1].noise - choice[m[0]].noise, 1e-30), m[0])
        )
        noise += option.noise - choice[name].noise
        choice[name] = option


def total_size(choice: dict[str, Option]) -> int:
    return sum(o.size for o in choice.values())
