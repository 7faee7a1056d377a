"""The labkit command, run as a learner would run it (a real subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import doctor, notebook
from labkit.errors import GPURequiredError

REPO = Path(__file__).resolve().parents[1]


def labkit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **(env or {})})


def test_doctor_passes_in_the_lab_environment():
    r = labkit("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bundled model smollm2" in r.stdout and "all required checks passed" in r.stdout


@pytest.mark.skipif(notebook.gpu_available(), reason="this machine has a GPU")
def test_doctor_require_gpu_fails_fast_without_one():
    r = labkit("doctor", "--require-gpu")
    assert r.returncode == 1
    assert "[FAIL] GPU" in r.stdout and "fix:" in r.stdout


def test_doctor_reports_lock_drift(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\nnumpy==0.0.1\npsutil==%s\nnot-installed-pkg==1.0\n" % __import__("psutil").__version__)
    drift = dict((n, (want, have)) for n, want, have in doctor.lock_drift(lock))
    assert set(drift) == {"numpy", "not-installed-pkg"}
    assert drift["not-installed-pkg"][1] is None


def test_hardware_json():
    r = labkit("hardware", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["logical_cores"] == os.cpu_count() and "llama.cpp" in data["engines"]


def test_run_unknown_notebook_is_an_error():
    r = labkit("run", "99_nonexistent")
    assert r.returncode != 0 and "No notebook matches" in r.stderr


def test_serve_foreground_bad_model_exits_1():
    r = labkit("serve", "llama.cpp", "--model", "/nonexistent/model.gguf")
    assert r.returncode == 1 and "error:" in r.stderr and "neither a bundled model" in r.stderr


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_serve_foreground_starts_and_stops(sigint):
    """Ctrl-C stops it, also when SIGINT came in ignored: a background job of a non-interactive shell (a script's
    `cmd &`, CI) inherits it so, and Python then installs no KeyboardInterrupt handler (this hung CI once)."""
    import signal
    import urllib.request
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint == "ignored" else None
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "serve", "llama.cpp"], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, preexec_fn=ignore)
    try:
        line = proc.stdout.readline()
        assert "serving 'smollm2' at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)          # Ctrl-C
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_gpu_cell_skips_or_demands(monkeypatch, capsys):
    monkeypatch.setattr(notebook, "gpu_available", lambda kind="any": False)
    ns = {}
    monkeypatch.delenv("LABKIT_REQUIRE_GPU", raising=False)
    assert notebook.run_gpu_cell("x = 1", ns) is False and "x" not in ns
    assert "Skipped" in capsys.readouterr().out
    monkeypatch.setenv("LABKIT_REQUIRE_GPU", "1")
    with pytest.raises(GPURequiredError):
        notebook.run_gpu_cell("x = 1", ns)
    monkeypatch.setattr(notebook, "gpu_available", lambda kind="any": True)
    assert notebook.run_gpu_cell("x = 1", ns) is True and ns["x"] == 1


def test_bench_cli_saves_results(tmp_path):
    r = labkit("bench", "--engine", "llama.cpp", "--max-tokens", "16", "--runs", "2", "--concurrency", "1", "2",
               "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert [row["concurrency"] for row in data["rows"]] == [1, 2]
    assert all(row["throughput_tps"] > 0 for row in data["rows"]) and data["fingerprint"]["cores"] >= 1


def test_vllm_cell_runs_skips_or_demands(monkeypatch, tmp_path, capsys):
    from labkit import env
    from labkit.errors import EngineNotInstalledError
    ns = {}
    assert notebook.run_vllm_cell("x = 1", ns) is True and ns["x"] == 1        # this lab has .venv-vllm
    # a machine without it (Binder): skipped with the reason, unless CI demands vLLM
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("LABKIT_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LABKIT_REQUIRE_VLLM", raising=False)
    ns = {}
    assert notebook.run_vllm_cell("x = 1", ns) is False and "x" not in ns
    assert "Skipped: this cell needs vLLM" in capsys.readouterr().out
    monkeypatch.setenv("CI", "1")
    with pytest.raises(EngineNotInstalledError, match="make setup"):
        notebook.run_vllm_cell("x = 1", ns)


def test_guarded_cells_display_their_last_expression_like_jupyter(monkeypatch, capsys):
    monkeypatch.setattr(notebook, "gpu_available", lambda kind="any": True)
    ns = {}
    assert notebook.run_gpu_cell("x = 20\nx + 22", ns) is True and ns["x"] == 20
    assert "42" in capsys.readouterr().out
    assert notebook.run_gpu_cell("y = 1\nNone", ns) and capsys.readouterr().out == ""
    assert notebook.run_vllm_cell("z = [1, 2]\nlen(z)", ns) and "2" in capsys.readouterr().out


def test_mcp_bad_backend_spec_exits_1():
    r = labkit("mcp", "--backend", "nonsense")
    assert r.returncode == 1 and "NAME=URL[,MODEL]" in r.stderr


def _descendants(pid):
    import psutil
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_mcp_http_starts_its_own_engine_and_stops_it():
    import signal
    import time

    import httpx
    import psutil

    from labkit.env import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "mcp", "--transport", "http", "--port", str(port),
                             "--token", "t0ken"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": "Bearer t0ken"}).status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, "the MCP server never answered /health"
            time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 401          # the token is required
        family = _descendants(proc.pid)
        assert any("llama_cpp.server" in " ".join(psutil.Process(p).cmdline()) for p in family), "no engine started"
        proc.send_signal(signal.SIGINT)          # Ctrl-C
        assert proc.wait(timeout=30) == 0
        time.sleep(1.0)                          # the engine's supervisor notices within a poll or two
        left = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, left
    finally:
        proc.kill()


def test_mcp_stdio_with_its_own_engine_keeps_stdout_for_the_protocol(tmp_path):
    """`labkit mcp` over stdio starting its engine: the engine's start must not write to stdout
    (the protocol's channel), and the engine must go when the client closes the session."""
    import asyncio
    import time

    import httpx
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def go():
        params = StdioServerParameters(command=sys.executable, args=["-m", "labkit.cli", "mcp"], env=dict(os.environ),
                                       cwd=str(REPO))
        with open(tmp_path / "mcp.log", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                catalogue = (await session.call_tool("list_models", {})).structuredContent
                reply = await session.call_tool("generate", {"prompt": "Hi", "max_tokens": 3})
        return catalogue, reply

    catalogue, reply = asyncio.run(go())
    local = catalogue["backends"][0]
    assert local["name"] == "local" and local["served"] and not reply.isError
    time.sleep(1.5)
    with pytest.raises(httpx.ConnectError):      # the engine it started is gone
        httpx.get(local["base_url"] + "/v1/models", timeout=2)
