"""Run one benchmark: ``python -m train.bench NAME [args]``.

Each benchmark is a module ``train.benchmarks.NAME`` with ``main(argv) -> int``;
``python -m train.bench`` alone lists them, ``python -m train.bench NAME --help``
documents one.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from train import benchmarks, cli


def available() -> list[str]:
    """Names of the benchmark modules."""
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m train.bench NAME [args]; NAME is one of: {', '.join(names)}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"error: NAME: unknown benchmark {name!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    result = importlib.import_module(f"train.benchmarks.{name}").main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
