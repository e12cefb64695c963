"""Human units: what parses, to what, and what is refused with which hint."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gvisor_mcp.policy.units import (
    UnitError,
    format_bytes,
    format_duration,
    format_mib,
    parse_bytes,
    parse_cpus,
    parse_duration,
    parse_mib,
)


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512MiB", 512),
        ("2GiB", 2048),
        ("1.5GiB", 1536),
        ("1Gi", 1024),
        ("1TiB", 1024 * 1024),
        ("1024KiB", 1),
        (" 256 MiB ", 256),
        (512, 512),
        ("512", 512),
    ],
)
def test_memory_sizes(text: object, mib: int) -> None:
    assert parse_mib(text) == mib


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("512MB", "ambiguous unit 'MB'"),
        ("512M", "ambiguous unit 'M'"),
        ("2G", "e.g. 2GiB"),
        ("1.5KiB", "whole number"),
        ("100KiB", "whole number of MiB"),
        ("lots", "not a size"),
        ("5 parsecs", "unknown unit"),
        ("12XiB", "unknown unit"),
        (True, "expected a size"),
        (-5, "non-negative"),
        ([1], "expected a size"),
    ],
)
def test_memory_refusals(text: object, fragment: str) -> None:
    with pytest.raises(UnitError, match="expected") as e:
        parse_mib(text)
    assert fragment in str(e.value)


def test_bare_bytes() -> None:
    assert parse_bytes(4096) == 4096
    assert parse_bytes("4KiB") == 4096
    assert parse_bytes("10B") == 10


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("2m", 120),
        ("1h", 3600),
        ("1d", 86400),
        ("1m30s", 90),
        ("1h 30m", 5400),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        (45, 45),
        (2.5, 2.5),
        ("90", 90),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 minutes", "s", "1x", "", "-5s", 0, -1, True, "1:30", None, "inf"])
def test_duration_refusals(text: object) -> None:
    with pytest.raises(UnitError, match="expected a"):
        parse_duration(text)


@pytest.mark.parametrize(("value", "cpus"), [(1, 1.0), (0.5, 0.5), (2.25, 2.25)])
def test_cpus(value: object, cpus: float) -> None:
    assert parse_cpus(value) == cpus


@pytest.mark.parametrize("value", ["2", True, 0, -1, float("nan"), float("inf"), "500m"])
def test_cpu_refusals(value: object) -> None:
    with pytest.raises(UnitError, match="CPU cores"):
        parse_cpus(value)


@pytest.mark.parametrize(("n", "text"), [(4096, "4KiB"), (1000, "1000B"), (10 * 1024 * 1024, "10MiB"), (0, "0B")])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(120, "2m"), (90, "90s"), (3600, "1h"), (0.5, "500ms"), (86400, "1d")])
def test_format_duration(s: float, text: str) -> None:
    assert format_duration(s) == text


@pytest.mark.slow
@given(st.integers(min_value=0, max_value=2**50))
def test_bytes_round_trip(n: int) -> None:
    assert parse_bytes(format_bytes(n)) == n


@pytest.mark.slow
@given(st.integers(min_value=1, max_value=2**20))
def test_mib_round_trip(n: int) -> None:
    assert parse_mib(format_mib(n)) == n


@pytest.mark.slow
@given(st.integers(min_value=1, max_value=10**7) | st.floats(min_value=0.001, max_value=10**6))
def test_duration_round_trip(s: float) -> None:
    assert parse_duration(format_duration(s)) == pytest.approx(s)
