"""Checks of a rendered variant, each with the change that breaks it.

A check is a function of a `Rendered` that yields one sentence per problem it finds. Each is
registered with `@check(breaker)`, where `breaker` changes a rendered variant in place the way
a careless edit of the manifests would; `test_manifests.py` runs every check on every variant,
and runs every check again on a broken copy to see that it does fail.

A *pair* check (`@pair_check(breaker)`, in `fleets.py`) looks at two fleets applied into one
namespace: it is given the fallback fleet, whose `main` is the fleet beside it, and runs on
the fallback fleet beside each main overlay, on each store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from manifests import Rendered

Problems = Iterator[str]


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Rendered], Problems]
    # Breaks a copy of a variant so that `run` must report a problem.
    breaker: Callable[[Rendered], None]


ALL: list[Check] = []
PAIRS: list[Check] = []


def check(breaker: Callable[[Rendered], None]):
    def register(fn: Callable[[Rendered], Problems]) -> Callable[[Rendered], Problems]:
        ALL.append(Check(fn.__name__, fn, breaker))
        return fn

    return register


def pair_check(breaker: Callable[[Rendered], None]):
    def register(fn: Callable[[Rendered], Problems]) -> Callable[[Rendered], Problems]:
        PAIRS.append(Check(fn.__name__, fn, breaker))
        return fn

    return register


def load_pairs() -> list[Check]:
    """Every pair check."""
    from checks import fleets  # noqa: F401  (registers on import)

    return PAIRS


def load() -> list[Check]:
    """Every check, from every module of this package."""
    from checks import keda, network, pods, wiring  # noqa: F401  (registers on import)

    return ALL
