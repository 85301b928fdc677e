"""Where a compiled program's time goes: per-operation times from a JAX profiler trace.

A helper of the benchmarks (the leading underscore keeps it out of `python -m train.bench`'s list).

On CPU, XLA runs a compiled program as a sequence of operations (fusions,
matrix products, copies, loops over their bodies), and the JAX profiler
records each execution under the operation's HLO name. This module runs a
program a few times under the profiler, keeps the events whose name is an
operation of that program (loops and calls, which only contain other
operations, are left out so that no time counts twice) and sums them by kind
(the name without its numeric suffix) or by output shape.

Times are summed over threads: on a machine with two worker threads the
total may exceed the wall time of a step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Callable, NamedTuple

import jax

# Operations whose events enclose those of the operations they call.
CONTAINERS = frozenset({"while", "conditional", "call", "async-start", "async-done"})

# `name = shape opcode(`; a shape is an array type or a (possibly nested) tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) ([\w\-]+)\(", re.M)


class OpTime(NamedTuple):
    """Calls and microseconds of one group of operations, per program run."""

    key: str
    calls: float
    us: float


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape, opcode), from a compiled program's text."""
    # Layouts ({1,0}) and index comments (/*index=5*/) are left out of the shape.
    shape = lambda text: re.sub(r"\{[^{}]*\}|/\*[^*]*\*/", "", text)  # noqa: E731
    return {m.group(1): (shape(m.group(2)), m.group(3)) for m in _INSTRUCTION.finditer(hlo_text)}


def _trace_events(trace_dir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not files:
        raise FileNotFoundError(f"{trace_dir}: the profiler wrote no perfetto_trace.json.gz")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(run: Callable[[], None], hlo_text: str, runs: int, trace_dir: str, by: str = "kind") -> list[OpTime]:
    """Per-operation times of ``runs`` calls of ``run`` (one compiled program), largest first.

    ``hlo_text`` is the program's ``compiled.as_text()``; ``by`` groups the
    operations by 'kind' (name without numeric suffix, e.g. ``fusion``,
    ``copy``) or by output 'shape'. Raises ValueError when the trace holds no
    event of the program's operations (a backend whose profiler does not
    record them).
    """
    if by not in ("kind", "shape"):
        raise ValueError(f"by: {by!r}, not 'kind' or 'shape'")
    ops = {name: info for name, info in instructions(hlo_text).items() if info[1] not in CONTAINERS}
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(runs):
            run()
    calls, us = collections.Counter(), collections.Counter()
    for event in _trace_events(trace_dir):
        name = event.get("name")
        if event.get("ph") != "X" or name not in ops:
            continue
        key = re.sub(r"\.\d+$", "", name) if by == "kind" else ops[name][0]
        calls[key] += 1
        us[key] += float(event.get("dur", 0.0))
    if not us:
        raise ValueError("the profiler recorded none of the program's operations")
    return [OpTime(key, calls[key] / runs, t / runs) for key, t in us.most_common()]


def markdown(rows: list[OpTime], top: int = 15) -> str:
    """A table of the ``top`` groups: calls and milliseconds per run, share of the total."""
    total = sum(r.us for r in rows) or 1.0
    lines = ["| operations | calls per run | ms per run | share |", "|---|---|---|---|"]
    for r in rows[:top]:
        lines.append(f"| {r.key} | {r.calls:g} | {r.us / 1e3:.2f} | {r.us / total:.0%} |")
    rest = rows[top:]
    if rest:
        lines.append(f"| ({len(rest)} more) | {sum(r.calls for r in rest):g} | {sum(r.us for r in rest) / 1e3:.2f} | "
                     f"{sum(r.us for r in rest) / total:.0%} |")
    lines.append(f"| all | {sum(r.calls for r in rows):g} | {total / 1e3:.2f} | 100% |")
    return "\n".join(lines)
