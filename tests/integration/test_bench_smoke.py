"""The benchmark must keep working: one short round of each app, figures printed."""

from __future__ import annotations

import re

import pytest

from bench import credentials_bench

pytestmark = pytest.mark.integration


def test_the_benchmark_runs_and_prints_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    rc = credentials_bench.main(
        [
            "--seconds",
            "1",
            "--rounds",
            "1",
            "--warmup-seconds",
            "0",
            "--python-loadgen",
            "--loadgen-processes",
            "1",
            "--connections",
            "2",
            "--workers",
            "1",
            "--threads",
            "2",
        ]
    )

    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("bare flask endpoint", "broker cached path", "broker, replay off"):
        row = re.search(rf"^{re.escape(name)}\s+(\d+)\s+[\d.]+\s+[\d.]+\s+(\d+)$", out, re.M)
        assert row, out
        assert int(row.group(1)) > 0  # requests per second
        assert int(row.group(2)) == 0  # errors
    assert re.search(r"ratio cached/bare: \d+\.\d\d", out)
