"""Dependency-injection speed: resolving through hostkit's container beside building the objects by hand.

Four cases, each timed beside its by-hand baseline in the same round:

* singleton: ``provider.get(Config)`` once it exists (baseline: reading a
  module-level variable through a function call);
* transient: ``provider.get(Formatter)``, a new object with no dependencies
  (baseline: ``Formatter()``);
* scope, 3-deep: ``with provider.create_scope() as scope: scope.get(Service)``
  where ``Service -> Repository -> Session`` are all scoped and ``Session`` has
  ``close()`` (baseline: ``s = Session(); Service(Repository(s)); s.close()``),
  so the figure includes the scope's creation, three resolutions and disposal;
* scope, 3-deep, as ``provider.run_in_scope(unit)`` with ``Service`` injected
  into ``unit`` (the one-line form; same baseline).

Each figure is the median over ``--rounds`` rounds (7 by default) of the time per
operation in a tight loop of ``--number`` operations; the ratio is the median of
per-round ratios, container and baseline timed back to back, in alternating order.
A calibration loop is timed each round and reported.

Run from the repository root::

    python benchmarks/di.py            # about 15 seconds
    python benchmarks/di.py --quick    # a few seconds

Results: a table on stdout and ``benchmarks/results/di.json``.

Targets (this 2-core machine): a scope with a 3-deep scoped graph, created,
resolved and disposed, under 20 µs, and within 10x of constructing by hand.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Target, report_targets, write_json

HERE = Path(__file__).resolve().parent

from hostkit import ServiceCollection, ServiceProvider  # noqa: E402

RESULTS = HERE / "results"
SCOPE_TARGET_US = 20.0
RATIO_TARGET = 10.0


class Config:
    pass


class Formatter:
    pass


class Session:
    def __init__(self) -> None:
        self.open = True

    def close(self) -> None:
        self.open = False


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session


class Service:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo


def make_provider() -> ServiceProvider:
    services = ServiceCollection()
    services.add_singleton(Config)
    services.add_transient(Formatter)
    services.add_scoped(Session)
    services.add_scoped(Repository)
    services.add_scoped(Service)
    return services.build_provider()


def cases(provider: ServiceProvider) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (container operation, by-hand baseline)."""
    config = provider.get(Config)

    def by_hand_config() -> Config:
        return config

    def scope_3deep() -> None:
        with provider.create_scope() as scope:
            scope.get(Service)

    def by_hand_3deep() -> None:
        session = Session()
        Service(Repository(session))
        session.close()

    def unit(service: Service) -> None:
        pass

    def run_in_scope_3deep() -> None:
        provider.run_in_scope(unit)

    return {
        "singleton": (lambda: provider.get(Config), by_hand_config),
        "transient": (lambda: provider.get(Formatter), Formatter),
        "scope_3deep": (scope_3deep, by_hand_3deep),
        "run_in_scope_3deep": (run_in_scope_3deep, by_hand_3deep),
    }


def per_op_us(fn: Callable[[], Any], number: int) -> float:
    began = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - began) / number * 1e6


def calibration_ms() -> float:
    began = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i % 7
    return (time.perf_counter() - began) * 1000


def run(rounds: int, number: int) -> dict[str, Any]:
    provider = make_provider()
    table = cases(provider)
    raw: dict[str, dict[str, list[float]]] = {name: {"di": [], "hand": [], "ratio": []} for name in table}
    calibrations = []
    for di, hand in table.values():  # warm-up: plans cached, types' disposal looked up
        per_op_us(di, 1000)
        per_op_us(hand, 1000)
    for r in range(rounds):
        calibrations.append(calibration_ms())
        for name, (di, hand) in table.items():
            if r % 2 == 0:
                d, h = per_op_us(di, number), per_op_us(hand, number)
            else:
                h, d = per_op_us(hand, number), per_op_us(di, number)
            raw[name]["di"].append(d)
            raw[name]["hand"].append(h)
            raw[name]["ratio"].append(d / h)
    provider.close()
    results = {}
    for name, runs in raw.items():
        results[name] = {
            "di_us": statistics.median(runs["di"]),
            "by_hand_us": statistics.median(runs["hand"]),
            "ratio": statistics.median(runs["ratio"]),
            "di_runs_us": runs["di"],
            "by_hand_runs_us": runs["hand"],
        }
    return {
        "benchmark": "di",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "rounds": rounds,
        "number": number,
        "calibration_ms": statistics.median(calibrations),
        "results": results,
    }


def targets(result: dict[str, Any]) -> list[Target]:
    scope = result["results"]["scope_3deep"]
    return [
        Target("scope, 3-deep: create, resolve, dispose", scope["di_us"], SCOPE_TARGET_US, unit=" µs"),
        Target("scope, 3-deep: within 10x of by hand", scope["ratio"], RATIO_TARGET, unit="x"),
    ]


def print_table(result: dict[str, Any]) -> None:
    print(f"hostkit DI, Python {result['python']}, median of {result['rounds']} rounds x {result['number']} ops")
    print(f"calibration: {result['calibration_ms']:.1f} ms")
    print()
    print(f"| {'case':<20} | {'container µs':>12} | {'by hand µs':>10} | {'ratio':>6} |")
    print(f"|{'-' * 22}|{'-' * 14}|{'-' * 12}|{'-' * 8}|")
    for name, r in result["results"].items():
        print(f"| {name:<20} | {r['di_us']:>12.2f} | {r['by_hand_us']:>10.2f} | {r['ratio']:>5.1f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 10,000 operations (a few seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7, or 3 with --quick)")
    parser.add_argument("--number", type=int, default=None, help="operations per timing (default 50,000)")
    parser.add_argument("--output", type=Path, default=RESULTS / "di.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 7)
    number = args.number or (10_000 if args.quick else 50_000)
    result = run(rounds, number)
    print_table(result)
    result["targets"] = report_targets(targets(result))
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
