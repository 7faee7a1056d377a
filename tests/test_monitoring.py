"""labkit.monitoring against a real Prometheus scraping a tiny exporter in a thread (no LLM needed).

Skipped where Prometheus is not installed, except under CI, where a missing one fails.
"""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
from conftest import installed_or_skip

from labkit import monitoring
from labkit.env import free_port
from labkit.notebook import prometheus_required


@pytest.fixture(scope="module")
def prometheus():
    return installed_or_skip(monitoring.prometheus_binary, prometheus_required(), "Prometheus")


class Exporter(BaseHTTPRequestHandler):
    """``/metrics`` in Prometheus's text format, like llama-server's: a counter that grows by 10 per
    second of wall time and a gauge set by the test."""

    def do_GET(self):
        served = 10 * (time.monotonic() - self.server.t0)
        body = (f"# TYPE demo:tokens_total counter\ndemo:tokens_total {served:.3f}\n"
                f"# TYPE demo:queue gauge\ndemo:queue {self.server.queue}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def exporter():
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), Exporter)
    srv.t0, srv.queue = time.monotonic(), 3
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_render_config_names_every_job():
    text = monitoring.render_config({"a": "127.0.0.1:1", "b b": "127.0.0.1:2"}, "2s")
    assert "scrape_interval: 2s" in text and '"b b"' in text and '["127.0.0.1:2"]' in text


@pytest.mark.full      # chapter 08 scrapes a real server with Prometheus in make test
def test_scrapes_queries_and_leaves_nothing_behind(prometheus, exporter):
    address = f"127.0.0.1:{exporter.server_address[1]}"
    with monitoring.start_prometheus([address, "127.0.0.1:9"], names=["demo", "nothing"]) as prom:
        assert prom.base_url.startswith("http://127.0.0.1:")
        pids, prefix = prom.pids(), prom.prefix
        assert (prefix / "prometheus.yml").exists()
        prom.jobs = {"demo": address}           # wait for the live target only
        prom.wait_for_scrapes(3)
        health = {t["job"]: t["health"] for t in prom.targets()}
        assert health["demo"] == "up" and health["nothing"] in ("down", "unknown")
        assert prom.query('demo:queue{job="demo"}')[0]["value"] == 3
        exporter.queue = 7
        time.sleep(2.5)
        series = [r["value"] for r in prom.query_range('demo:queue{job="demo"}', since=10, step=0.5)]
        assert series[-1] == 7 and 3 in series
        rate = prom.query('rate(demo:tokens_total{job="demo"}[5s])')[0]["value"]
        assert 8 < rate < 12                     # the exporter's counter grows 10 per second
        with pytest.raises(ValueError, match="refused"):
            prom.query("rate(demo:queue[")
    assert not prefix.exists()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
