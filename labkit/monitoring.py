"""Prometheus watching the engines: a managed, throw-away Prometheus server (introduced in chapter 08).

>>> with labkit.serve("llama-server", metrics=True) as engine:                  # doctest: +SKIP
...     with start_prometheus([engine], scrape_interval="1s") as prom:
...         ...  # load the engine
...         prom.query_range('rate(llamacpp:tokens_predicted_total[5s])', since=60)

:func:`start_prometheus` writes a ``prometheus.yml`` that scrapes each engine's ``/metrics``
(llama-server with ``metrics=True``, vLLM always) every ``scrape_interval``, and runs Debian's
``prometheus`` on a free loopback port with its data in a temporary folder — under labkit's
supervisor, like nginx in :mod:`labkit.proxy`: stopped by ``stop()``, at the end of a ``with``
block, at exit, or when the notebook's kernel dies, and its folder deleted.

:meth:`Prometheus.query` and :meth:`Prometheus.query_range` run PromQL through Prometheus's HTTP
API (``/api/v1/query``, ``/api/v1/query_range``) and return plain rows for pandas.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .env import free_port
from .errors import EngineNotInstalledError
from .servers import FolderServer, Server, _start

INSTALL_HINT = ("Install it with `sudo apt-get install prometheus` (Debian/Ubuntu; `brew install prometheus` on "
                "macOS), or run `make setup` as root, which installs it. labkit runs its own Prometheus from a "
                "temporary folder; the system service is not needed (leave it stopped).")
READY_PATH = "/-/ready"


def prometheus_binary() -> Path:
    """Path of the prometheus program: ``$LABKIT_PROMETHEUS``, ``PATH``, then /usr/bin."""
    for cand in (os.environ.get("LABKIT_PROMETHEUS"), shutil.which("prometheus"), "/usr/bin/prometheus"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    raise EngineNotInstalledError(f"Prometheus is not installed here. {INSTALL_HINT}")


def _target(backend) -> str:
    if isinstance(backend, (Server, FolderServer)):
        return backend.base_url.split("://", 1)[1]
    return str(backend).split("://", 1)[-1].rstrip("/")


def render_config(targets: dict[str, str], scrape_interval: str = "1s") -> str:
    """``prometheus.yml`` with one scrape job per target (``{job name: "host:port"}``); YAML is a
    superset of JSON, so each value is written as a JSON string.

    >>> print(render_config({"engine-0": "127.0.0.1:8080"}), end="")
    global:
      scrape_interval: 1s
      evaluation_interval: 1s
    scrape_configs:
      - job_name: "engine-0"
        static_configs:
          - targets: ["127.0.0.1:8080"]
    """
    import json
    lines = ["global:", f"  scrape_interval: {scrape_interval}", f"  evaluation_interval: {scrape_interval}",
             "scrape_configs:"]
    for job, address in targets.items():
        lines += [f"  - job_name: {json.dumps(job)}", "    static_configs:", f"      - targets: [{json.dumps(address)}]"]
    return "\n".join(lines) + "\n"


@dataclass(eq=False)
class Prometheus(FolderServer):
    """A running Prometheus; ``prefix`` holds its configuration and its time-series data."""

    jobs: dict

    def _api(self, path: str, **params) -> list:
        import httpx
        reply = httpx.get(f"{self.base_url}/api/v1/{path}", params=params, timeout=30)
        body = reply.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {params.get('query', path)!r}: {body.get('error', reply.text)}")
        return body["data"]["result"] if "result" in body["data"] else body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query: one row per series, ``{"job": ..., <labels>, "value": float}``."""
        return [{**r["metric"], "value": float(r["value"][1])} for r in self._api("query", query=promql)]

    def query_range(self, promql: str, since: float = 60, step: float | None = None, until: float | None = None) -> list[dict]:
        """A range query over the last ``since`` seconds: one row per series and sample,
        ``{"time": seconds since the window started, "job": ..., <labels>, "value": float}``."""
        end = until or time.time()
        start = end - since
        step = step or max(0.5, since / 200)
        rows = []
        for series in self._api("query_range", query=promql, start=start, end=end, step=step):
            rows += [{"time": float(t) - start, **series["metric"], "value": float(v)} for t, v in series["values"]]
        return rows

    def targets(self) -> list[dict]:
        """Each scrape target: job, health ("up"/"down"/"unknown"), last error, last scrape time."""
        data = self._api("targets")
        return [{"job": t["labels"].get("job"), "health": t["health"], "error": t.get("lastError", ""),
                 "last_scrape": t.get("lastScrape")} for t in data["activeTargets"]]

    def wait_for_scrapes(self, n: int = 2, timeout: float = 30) -> None:
        """Wait until every target has been scraped successfully ``n`` times (``up`` has n samples)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = {r["job"]: r["value"] for r in self.query("count_over_time(up[1m])")}
            healthy = {r["job"] for r in self.query("up == 1")}
            if set(self.jobs) <= healthy and all(counts.get(j, 0) >= n for j in self.jobs):
                return
            time.sleep(0.25)
        raise TimeoutError(f"Prometheus did not scrape every target {n} times in {timeout:.0f} s: {self.targets()}")


def start_prometheus(backends, *, scrape_interval: str = "1s", names: list[str] | None = None,
                     ready_timeout: float = 60) -> Prometheus:
    """Start Prometheus scraping ``backends`` (labkit Servers, or ``host:port``) every ``scrape_interval``.

    Each backend is one job, named ``names[i]`` or ``engine-<i>``; PromQL selects it with
    ``{job="engine-0"}``. Data lives in a temporary folder kept for one hour at most.
    """
    binary = prometheus_binary()                    # the install hint before anything is written
    names = names or [f"engine-{i}" for i in range(len(backends))]
    jobs = dict(zip(names, (_target(b) for b in backends), strict=True))
    prefix = Path(tempfile.mkdtemp(prefix="labkit-prometheus-"))
    try:
        (prefix / "prometheus.yml").write_text(render_config(jobs, scrape_interval))
        port = free_port()
        argv = [str(binary), f"--config.file={prefix / 'prometheus.yml'}", f"--storage.tsdb.path={prefix / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"]
        server = _start("prometheus", "prometheus", "127.0.0.1", port, None, argv, {}, READY_PATH, ready_timeout)
    except BaseException:
        shutil.rmtree(prefix, ignore_errors=True)
        raise
    return Prometheus(server, prefix, jobs)


__all__ = ["start_prometheus", "Prometheus", "render_config", "prometheus_binary"]
