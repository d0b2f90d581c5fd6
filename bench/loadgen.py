"""A small closed-loop HTTP load generator (keep-alive, one connection per worker).

Used when `wrk` is not installed. Runs workers in several processes so the generator is
not limited to one core by the GIL.
"""

from __future__ import annotations

import http.client
import multiprocessing
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def _worker(
    url: str,
    bodies: list[bytes],
    seconds: float,
    connections: int,
    out: multiprocessing.Queue[tuple[int, int, list[float]]],
) -> None:
    import threading

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"ok": 0, "err": 0}
    deadline = time.perf_counter() + seconds

    def loop(mine: list[bytes]) -> None:
        conn = http.client.HTTPConnection(host, parts.port, timeout=30)
        local: list[float] = []
        ok = err = 0
        sent = 0
        while time.perf_counter() < deadline:
            body = mine[sent % len(mine)]
            sent += 1
            start = time.perf_counter()
            try:
                conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    ok += 1
                else:
                    err += 1
            except (OSError, http.client.HTTPException):
                err += 1
                conn.close()
                conn = http.client.HTTPConnection(host, parts.port, timeout=30)
            local.append((time.perf_counter() - start) * 1000)
        conn.close()
        with lock:
            latencies.extend(local)
            counts["ok"] += ok
            counts["err"] += err

    # Each connection cycles through its own share of the bodies.
    threads = [
        threading.Thread(target=loop, args=(bodies[i::connections] or bodies,))
        for i in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((counts["ok"], counts["err"], latencies))


def run(
    url: str, bodies: list[bytes], *, seconds: float, processes: int, connections: int
) -> Result:
    """Closed-loop load; the bodies are shared out between processes and connections."""
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [
        multiprocessing.Process(
            target=_worker,
            args=(url, bodies[p::processes] or bodies, seconds, connections, queue),
        )
        for p in range(processes)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    ok = err = 0
    latencies: list[float] = []
    for _ in procs:
        o, e, lat = queue.get(timeout=seconds + 60)
        ok, err = ok + o, err + e
        latencies.extend(lat)
    for p in procs:
        p.join()
    return Result(ok, err, time.perf_counter() - start, latencies)
