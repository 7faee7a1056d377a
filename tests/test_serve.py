"""labkit.serve against the real llama.cpp server (llama-cpp-python's OpenAI-compatible server)."""
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import psutil
import pytest

import labkit
from labkit.errors import EngineNotInstalledError, PortInUseError, ServerStartError
from labkit.servers import port_is_free, running


def _gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _family(pid):
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_start_chat_stop():
    with labkit.serve("llama.cpp") as srv:
        assert srv.host == "127.0.0.1" and srv.base_url.startswith("http://127.0.0.1:")
        assert srv.model == "smollm2"
        assert srv in running()
        client = srv.openai()
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        reply = client.chat.completions.create(model=srv.model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hi."}])
        assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content
        chunks = list(client.chat.completions.create(model=srv.model, max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": "Count: 1, 2,"}]))
        assert len(chunks) > 2
        assert "llama" in srv.logs(200).lower() or "uvicorn" in srv.logs(200).lower()
        family, port = _family(srv.pid), srv.port
        assert len(family) >= 2          # supervisor + engine
    assert _gone(family), "server processes survived the end of the with-block"
    assert port_is_free(port)
    assert srv not in running()
    srv.stop()                           # stopping twice is harmless


def test_error_inside_with_block_still_stops_the_server():
    with pytest.raises(ZeroDivisionError):
        with labkit.serve("llama.cpp") as srv:
            family = _family(srv.pid)
            1 / 0
    assert _gone(family)


def test_no_orphans_when_the_owner_is_killed():
    owner_code = textwrap.dedent("""
        import time, psutil, labkit
        srv = labkit.serve("llama.cpp")
        kids = [c.pid for c in psutil.Process(srv.pid).children(recursive=True)]
        print(srv.port, srv.pid, *kids, flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    try:
        port, *pids = map(int, owner.stdout.readline().split())
        assert len(pids) >= 2 and all(psutil.pid_exists(p) for p in pids)
        owner.kill()                     # like a kernel killed by the OOM killer or `kill -9`
        owner.wait()
        assert _gone(pids), f"orphans left behind: {[p for p in pids if psutil.pid_exists(p)]}"
        assert port_is_free(port)
    finally:
        owner.kill()


def test_fixed_busy_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(PortInUseError, match=f"Port {port} .* already in use"):
            labkit.serve("llama.cpp", port=port)
        assert time.monotonic() - t0 < 5


def _no_new_servers(before) -> bool:
    """Nothing left running that was not running before (a session-wide test server may be)."""
    return all(any(s is b for b in before) for s in running())


def test_failing_start_raises_with_the_log_tail():
    before = running()
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        labkit.serve("llama.cpp", n_ctx="not-a-number")
    message = str(info.value)
    assert "exited with code" in message and "n_ctx" in message   # the engine's own complaint
    assert time.monotonic() - t0 < 60
    assert _no_new_servers(before)


@pytest.mark.parametrize("key", ["s3cret", "-Kx9_starts-with-a-dash"])   # secrets.token_urlsafe() can start with "-"
def test_api_key_is_enforced(key):
    with labkit.serve("llama.cpp", api_key=key) as srv:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(srv.base_url + "/v1/models", timeout=10)
        assert info.value.code == 401
        assert srv.openai().models.list().data[0].id == srv.model


def test_corrupt_model_fails_before_any_process_starts(tmp_path, smollm2_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(smollm2_path.read_bytes()[:5000])
    before = running()
    with pytest.raises(labkit.CorruptModelError):
        labkit.serve("llama.cpp", model=bad)
    assert _no_new_servers(before)


def test_unknown_engine():
    with pytest.raises(ValueError, match="choose one of"):
        labkit.serve("tgi")


def test_vllm_missing_environment_is_named(monkeypatch, tmp_path):
    from labkit import env
    from labkit import servers as serve_module
    monkeypatch.setenv("LABKIT_VLLM_PYTHON", "")
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)
    import importlib.util
    if importlib.util.find_spec("vllm"):
        pytest.skip("vLLM is importable in this interpreter")
    with pytest.raises(EngineNotInstalledError, match="make setup"):
        serve_module.vllm_python()


def test_oversized_context_is_refused_before_starting():
    from labkit.errors import InsufficientMemoryError
    before = running()
    t0 = time.monotonic()
    with pytest.raises(InsufficientMemoryError, match=r"n_ctx ≈ \d+ would fit.*q8_0"):
        labkit.serve("llama.cpp", n_ctx=100_000_000)
    assert time.monotonic() - t0 < 5 and _no_new_servers(before)


def test_python_server_gets_the_same_threads_as_llama_server(smollm2_path):
    # llama-cpp-python's own default is CPUs // 2: one thread on a 2-core VM, beside engines using two
    from labkit.env import usable_cores
    from labkit.servers import _command

    def flag(argv, name):
        return argv[argv.index(name) + 1]
    argv, _, _ = _command("llama.cpp", smollm2_path, "m", "127.0.0.1", 1, None, {})
    assert flag(argv, "--n_threads") == flag(argv, "--n_threads_batch") == str(usable_cores())
    argv, _, _ = _command("llama.cpp", smollm2_path, "m", "127.0.0.1", 1, None, {"n_threads": 1})
    assert flag(argv, "--n_threads") == "1" and argv.count("--n_threads") == 1
