"""Human units in policy files: `512MiB`, `2GiB`, `30s`, `2m`, `1.5` CPUs.

Operators write limits the way they think about them; the sandbox wants plain
numbers. Parsing is strict on purpose: a typo such as `512MB` (decimal or
binary? docker says binary, SI says decimal) is an error that names the
accepted spellings, not a silent guess.

Decisions (documented in docs/policy.md):
- Sizes use binary suffixes only: `B`, `KiB`, `MiB`, `GiB`, `TiB` (also the
  short `Ki`, `Mi`, `Gi`, `Ti`). `KB`/`MB`/`GB`/`K`/`M`/`G` are rejected as
  ambiguous. Fractions are allowed (`1.5GiB`) when the result is whole.
- A bare number means MiB for memory-like sizes (`memory`, `workspace.size`,
  matching the sandbox's `memory_mb`) and bytes for byte counts
  (`max_output`, `output.head`/`tail`, `env.max_bytes`).
- Durations: `ms`, `s`, `m`, `h`, `d`, combinable (`1m30s`); a bare number
  means seconds.
- CPUs: a plain number of cores (`0.5`, `2`); no `500m` millicores.
"""

from __future__ import annotations

import math
import re
from typing import Any

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kib": KIB,
    "ki": KIB,
    "mib": MIB,
    "mi": MIB,
    "gib": GIB,
    "gi": GIB,
    "tib": TIB,
    "ti": TIB,
}
_AMBIGUOUS = {"k", "kb", "m", "mb", "g", "gb", "t", "tb"}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)")
_DURATION_RE = re.compile(r"^\s*(?:[0-9]+(?:\.[0-9]+)?\s*(?:ms|s|m|h|d)\s*)+$")

SIZE_EXPECTED = "a size like 512MiB, 2GiB or 64KiB (binary units B, KiB, MiB, GiB, TiB)"
DURATION_EXPECTED = "a duration like 30s, 2m, 1h or 1m30s (a bare number means seconds)"
CPUS_EXPECTED = "a number of CPU cores like 0.5, 1 or 2"


class UnitError(ValueError):
    """A value that is not in the expected unit; the text says what would be."""


def _number(value: Any) -> float | None:
    """A real YAML number (not a bool, which Python counts as an int)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def parse_bytes(value: Any, *, bare_unit: int = 1) -> int:
    """Parse a size into bytes; a bare number is multiplied by `bare_unit`."""
    num = _number(value)
    if num is not None:
        total = num * bare_unit
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise UnitError(f"{value!r} is not a size; expected {SIZE_EXPECTED}")
        digits, unit = m.group(1), m.group(2).lower()
        if unit == "":
            total = float(digits) * bare_unit
        elif unit in _SIZE_UNITS:
            total = float(digits) * _SIZE_UNITS[unit]
        elif unit in _AMBIGUOUS:
            raise UnitError(
                f"{value!r} uses the ambiguous unit {m.group(2)!r}; expected binary units, "
                f"e.g. {digits}{'MiB' if unit.startswith('m') else unit[0].upper() + 'iB'}"
            )
        else:
            raise UnitError(f"{value!r} has an unknown unit {m.group(2)!r}; expected {SIZE_EXPECTED}")
    else:
        raise UnitError(f"got {type(value).__name__} {value!r}; expected {SIZE_EXPECTED}")
    if not math.isfinite(total) or total < 0:
        raise UnitError(f"{value!r} is not a finite, non-negative size; expected {SIZE_EXPECTED}")
    if total != int(total):
        raise UnitError(f"{value!r} is not a whole number of bytes; expected {SIZE_EXPECTED}")
    return int(total)


def parse_mib(value: Any) -> int:
    """Parse a memory-like size into whole MiB; a bare number is MiB."""
    total = parse_bytes(value, bare_unit=MIB)
    if total % MIB:
        raise UnitError(f"{value!r} is not a whole number of MiB; expected {SIZE_EXPECTED}, in whole MiB")
    return total // MIB


def parse_duration(value: Any) -> float:
    """Parse a duration into seconds; a bare number is seconds."""
    num = _number(value)
    if num is not None:
        seconds = num
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION_RE.match(text):
                raise UnitError(f"{value!r} is not a duration; expected {DURATION_EXPECTED}") from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise UnitError(f"got {type(value).__name__} {value!r}; expected {DURATION_EXPECTED}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise UnitError(f"{value!r} is not a positive duration; expected {DURATION_EXPECTED}")
    return seconds


def parse_cpus(value: Any) -> float:
    """Parse a CPU count; strings are refused so `"2"` vs `2` never matters."""
    num = _number(value)
    if num is None:
        raise UnitError(f"got {type(value).__name__} {value!r}; expected {CPUS_EXPECTED}")
    if not math.isfinite(num) or num <= 0:
        raise UnitError(f"{value!r} is not a positive number; expected {CPUS_EXPECTED}")
    return num


def format_bytes(n: int) -> str:
    """The shortest exact binary spelling: 4096 -> '4KiB', 1000 -> '1000B'."""
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def format_mib(mib: int) -> str:
    """A MiB count as a size string: 512 -> '512MiB', 2048 -> '2GiB'."""
    return format_bytes(mib * MIB)


def format_duration(seconds: float) -> str:
    """Seconds as a duration string: 120 -> '2m', 90 -> '90s', 0.5 -> '500ms'."""
    if seconds == int(seconds):
        s = int(seconds)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if s % size == 0:
                return f"{s // size}{unit}"
        return f"{s}s"
    ms = seconds * 1000
    if ms == int(ms):
        return f"{int(ms)}ms"
    return f"{seconds!r}s"
