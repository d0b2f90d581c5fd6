"""Where a broker worker's time goes under one mix: py-spy samples, summed by function.

``python3 run.py bench --profile DIR`` runs ``py-spy record`` on every gunicorn worker of
each broker row while the load runs (py-spy is pip-installed into the venv on first use:
a measuring tool, not a dependency of the broker). It writes the raw collapsed stacks
to DIR and prints, per row, the functions that hold the most samples: ``total`` counts
a sample for every function on its stack (where the time is spent below), ``self``
only for the innermost one. Idle samples (a greenlet or thread waiting on a socket) are
left out, so the shares are of the worker's busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*)\)$")


def _binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # pip installs it into the venv
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return _binary() is not None


def install() -> bool:
    """pip-install py-spy into this venv; whether it is there now."""
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "py-spy"]
    subprocess.run(argv, check=False, stdout=subprocess.DEVNULL)
    return available()


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` and its children (the gunicorn workers) for ``seconds``."""
    argv = [_binary() or "py-spy", "record", "--pid", str(pid), "--subprocesses", "--format", "raw"]
    argv += ["--nolineno", "--rate", "250", "--nonblocking"]
    argv += ["--duration", str(max(1, int(seconds))), "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m.group('func')} ({m.group('file')})"


def summarize(path: Path, *, top: int = 25) -> str:
    total: Counter[str] = Counter()
    own: Counter[str] = Counter()
    samples = 0
    if not path.exists():
        return f"  (no samples in {path.name})"
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_name(f) for f in stack.split(";")]
        # The worker's own frames start below gunicorn's; the process line is first.
        frames = [f for f in frames if not f.startswith("process ")]
        count = int(count_text)
        samples += count
        for name in set(frames):
            total[name] += count
        if frames:
            own[frames[-1]] += count
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} busy samples; share of them: total (self)  function"]
    for name, count in total.most_common(top):
        lines.append(f"  {100 * count / samples:5.1f}% ({100 * own[name] / samples:4.1f}%)  {name}")
    return "\n".join(lines)
