"""labkit.engines: one record per engine. A dummy engine registered from this file alone is started by
labkit.serve, polled by the router's health check, listed by labkit doctor and the command line, and
gates a %%needs cell — no other file names it."""
import sys
import textwrap
import time

import pytest

import labkit
from labkit import cli, doctor, engines, notebook, router
from labkit.errors import EngineNotInstalledError

# A tiny HTTP engine: 200 on /ready and /ping, 404 elsewhere; it says which model it was given.
DUMMY_SERVER = textwrap.dedent("""
    import http.server, sys
    port, model = int(sys.argv[1]), sys.argv[2]
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path in ("/ready", "/ping")
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(model.encode() if ok else b"")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")
INSTALLED = {"dummy": True}


def dummy_command(model_path, name, host, port, api_key, options):
    return [sys.executable, "-c", DUMMY_SERVER, str(port), name], {}


def locate_dummy():
    if not INSTALLED["dummy"]:
        raise EngineNotInstalledError("the dummy engine is not installed")
    return sys.executable


@pytest.fixture
def dummy():
    record = engines.register(engines.Engine(
        "dummy", "a test engine", dummy_command, "/ready", "/ping", 20, locate=locate_dummy,
        needs_label="the dummy engine", require_env="LABKIT_REQUIRE_DUMMY", stream=None))
    INSTALLED["dummy"] = True
    yield record
    engines.unregister("dummy")


def test_the_shipped_engines_are_complete():
    assert set(engines.names()) >= {"llama.cpp", "llama-server", "vllm", "ollama", "rpc"}
    for engine in engines.all_engines():
        assert callable(engines.resolve(engine.command)), engine.name        # every builder exists
        assert engine.locate is None or callable(engines.resolve(engine.locate)), engine.name
        assert engine.chat_model is None or engine.chat_model.count(":") == 1, engine.name
        assert engine.stream in ("sse", "ndjson", None) and engine.start_timeout_s > 0, engine.name
    with pytest.raises(ValueError, match="Unknown engine 'nope'; choose one of llama.cpp"):
        engines.get("nope")


def test_serve_starts_a_registered_engine_and_the_router_polls_it(dummy):
    with labkit.serve("dummy", "smollm2") as srv:
        backend = router.Backend.from_server(srv)
        assert backend.health_path == "/ping"                     # the record's health path, not /ready
        checker = router.HealthChecker([backend], interval=0.1, timeout=2)
        try:
            deadline = time.monotonic() + 5
            while checker.status[backend.name]["probes"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert checker.status[backend.name]["healthy"] is True, checker.status
        finally:
            checker.stop()
    assert srv.process.poll() is not None                         # stopped with the block


def test_doctor_and_the_command_line_list_it(dummy):
    rows = {c.name.split(":")[0]: c for c in doctor.engine_checks()}
    assert rows["engine dummy"].ok and rows["engine dummy"].detail == sys.executable
    INSTALLED["dummy"] = False
    missing = doctor.engine_check(dummy)
    assert not missing.ok and not missing.required and "not installed" in missing.detail
    args = cli.build_parser().parse_args(["serve", "dummy"])
    assert args.engine == "dummy"


def test_needs_runs_or_skips_on_the_record(dummy, monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    ns = {}
    assert notebook.run_cell_needing(["dummy"], "x = 1", ns) is True and ns["x"] == 1
    INSTALLED["dummy"] = False
    ns = {}
    assert notebook.run_cell_needing(["dummy"], "x = 1", ns) is False and "x" not in ns
    assert "Skipped: this cell needs the dummy engine" in capsys.readouterr().out
    monkeypatch.setenv("LABKIT_REQUIRE_DUMMY", "1")                # required: an error, not a skip
    with pytest.raises(EngineNotInstalledError):
        notebook.run_cell_needing(["dummy"], "x = 1", ns)
