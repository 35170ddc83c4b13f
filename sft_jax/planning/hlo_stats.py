"""What a compiled, SPMD-partitioned XLA program says about itself: the bytes each collective
moves per device (read from its HLO text), and the compiler's warnings while it compiled."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Bytes a device sends per byte of the collective's full buffer, over a ring of n devices.
_WIRE = {
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 0.5,
    "u4": 0.5,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}


INVOLUNTARY = "Involuntary full rematerialization"  # what XLA's SPMD partitioner warns


_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLED = re.compile(r"(body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> float:
    return sum(
        _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _SHAPE.findall(text)
    )


def _group_size(line: str, devices: int) -> int:
    named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if named:  # mesh['axis_0'=8,'axis_1'=1] {'axis_0'}: the product of the axes named
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", named.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    return len(listed.group(1).split(",")) if listed else devices


def _computations(hlo: str) -> dict[str, list[str]]:
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)  # headers start a line; instructions are indented
        if match:
            name = match.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    return bodies


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How often each computation runs per call of `entry` (while bodies: their trip count)."""
    runs = {entry: 1}
    pending = [entry]
    while pending:
        name = pending.pop()
        for line in bodies.get(name, ()):
            trips = _TRIPS.search(line)
            for kind, callee in _CALLED.findall(line):
                times = int(trips.group(1)) if trips and kind == "body" else 1
                if callee in bodies and callee != name:
                    runs[callee] = runs.get(callee, 0) + runs[name] * times
                    pending.append(callee)
    return runs


def collective_bytes(hlo: str, devices: int) -> tuple[dict[str, float], dict[str, float]]:
    """(full-buffer bytes, bytes sent over the wire) per device per step of each collective kind
    in a compiled, SPMD-partitioned HLO module: an all-gather counts its gathered result, a
    reduce-scatter its input, an all-reduce / all-to-all / permute its operand; loops count
    once per trip. Wire bytes assume ring algorithms over each replica group."""
    bodies = _computations(hlo)
    entry = next(
        (line.split()[1].lstrip("%") for line in hlo.splitlines() if line.startswith("ENTRY ")), ""
    )
    runs = _executions(bodies, entry)
    buffer = dict.fromkeys(COLLECTIVES, 0.0)
    wire = dict.fromkeys(COLLECTIVES, 0.0)
    for name, lines in bodies.items():
        for line in lines:
            op = _OP.search(line)
            if not op:
                continue
            kind, result = op.group(2), op.group(1)
            if op.group(3):  # async start: a tuple of (operands, results); take the results
                result = result[result.rfind("(") :]
            group = _group_size(line, devices)
            # Operands carry no shapes in the text: a reduce-scatter's input is its result
            # times the group; the other kinds' operands are as large as their results.
            size = _shape_bytes(result) * (group if kind == "reduce-scatter" else 1)
            count = runs.get(name, 0)
            buffer[kind] += count * size
            wire[kind] += count * size * _WIRE[kind](group)
    return buffer, wire


@contextlib.contextmanager
def compiler_log() -> Iterator[list[str]]:
    """Captures what the compiler writes to stderr (file descriptor 2) into a list of lines,
    and passes it on to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            lines.extend(text.splitlines())
            sys.stderr.write(text)
