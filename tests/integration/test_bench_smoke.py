"""The benchmark must keep working: one short row of each mix and app, figures printed.

Not a timed test: it asserts that every row has figures, that the new-identities mix
made exactly one STS call per identity, and that nothing failed, never how fast.
"""

from __future__ import annotations

import re

import pytest

from bench import credentials_bench

pytestmark = pytest.mark.integration

ROW = re.compile(
    r"^(?P<mix>one token|cached identities|fresh tokens|new identities)\s+"
    r"(?P<app>bare flask|broker replay on|broker replay off)\s+(?P<rps>\d+)\s+[\d.]+\s+"
    r"\d+-\d+\s+"
    r"[\d.]+\s+[\d.]+\s+(?P<errors>\d+)\s+(?P<requests>\d+)\s+(?P<sts>\d+)\s+"
    r"(?P<subjects>\d+)\s+(?P<peak>\d+)\s+(?P<rss>[\d/]+)$",
    re.M,
)


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_the_benchmark_runs_and_prints_its_figures(
    capsys: pytest.CaptureFixture[str], worker_class: str
) -> None:
    rc = credentials_bench.main(
        [
            "--seconds",
            "1",
            "--warmup-seconds",
            "0",
            "--warm-seconds",
            "0",
            "--rounds",
            "1",
            "--python-loadgen",
            "--loadgen-processes",
            "1",
            "--connections",
            "2",
            "--new-connections",
            "4",
            "--identities",
            "20",
            "--pool",
            "400",
            "--sts-latency-ms",
            "20",
            "--workers",
            "1",
            "--threads",
            "2",
            "--worker-class",
            worker_class,
        ]
    )

    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {(m["mix"], m["app"]): m for m in ROW.finditer(out)}
    assert len(rows) == 12, out
    for row in rows.values():
        assert int(row["rps"]) > 0, out
        assert int(row["errors"]) == 0, out
        assert all(float(mb) > 0 for mb in row["rss"].split("/")), out
    for app in ("broker replay on", "broker replay off"):
        new = rows[("new identities", app)]
        # Every identity was new, so every successful request cost exactly one STS call.
        assert int(new["sts"]) == int(new["subjects"]) > 0, out
        assert int(new["sts"]) == int(new["requests"]), out
        # Cached identities with a cache warmed before the row: no STS call at all.
        assert int(rows[("cached identities", app)]["sts"]) == 0, out
    assert re.search(r"new identities, broker replay off: \d+\.\d\d", out)
    assert re.search(r"worker RSS, broker replay on: \d+ MB = \d+\.\d\d x bare flask", out)
