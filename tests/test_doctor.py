"""labkit doctor: each failure induced for real, and the exit code follows."""
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

from labkit import doctor, engines, models

REPO = Path(__file__).resolve().parents[1]


def by_name(checks):
    return {c.name: c for c in checks}


def test_all_pass_here():
    checks = doctor.run_checks()
    assert doctor.passed(checks), doctor.format_checks(checks)
    assert "memory for default model at n_ctx=2048" in by_name(checks)
    assert "WSL" in by_name(checks)          # "not WSL" here; on WSL 2 its rows follow (tests/test_wsl.py)


def test_missing_model_package_fails(monkeypatch):
    ghost = dataclasses.replace(models.BUNDLED["minilm"], module="labkit_ghost_pkg", package="ghost-pkg")
    monkeypatch.setitem(models.BUNDLED, "minilm", ghost)
    checks = doctor.run_checks()
    c = by_name(checks)["bundled model minilm"]
    assert not c.ok and "ghost-pkg" in c.detail and not doctor.passed(checks)


def test_context_too_large_for_ram_fails():
    checks = doctor.run_checks(n_ctx=50_000_000)        # a 50M-token KV cache: ~1 TiB
    c = by_name(checks)["memory for default model at n_ctx=50000000"]
    assert not c.ok and "quantized KV cache" in c.fix and not doctor.passed(checks)


def test_busy_port_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        checks = doctor.run_checks(ports=[port])
    assert not by_name(checks)[f"port {port}"].ok and not doctor.passed(checks)


def test_a_missing_second_architecture_model_is_a_warning_with_its_command(monkeypatch):
    # as on a fresh machine: make setup installs no extras (and no copy of it sits in labkit's cache either,
    # as one does after `make test-models`: another file name)
    ghost = dataclasses.replace(models.BUNDLED["gemma3"], module="labkit_ghost_extra", package="ghost-extra",
                                relpath="ghost-extra-model.gguf")
    monkeypatch.setitem(models.BUNDLED, "gemma3", ghost)
    checks = doctor.run_checks()
    c = by_name(checks)["bundled model gemma3"]
    assert not c.ok and not c.required and c.fix == "make test-models" and doctor.passed(checks), c


def test_lock_drift_is_a_warning_not_a_failure(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1\n")
    checks = doctor.run_checks(lock=lock)
    c = by_name(checks)["versions match requirements/lock.txt"]
    assert not c.ok and "numpy" in c.detail and not c.required
    assert doctor.passed(checks)


def test_corrupt_model_path_fails(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(3))
    checks = doctor.run_checks(model=bad)
    assert not doctor.passed(checks) and "truncated" in by_name(checks)[f"model {bad}"].detail


def test_cli_json_and_exit_code():
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "doctor", "--json", "--n-ctx", "50000000"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    data = json.loads(r.stdout)
    assert r.returncode == 1 and data["passed"] is False
    assert any(not c["ok"] and c["name"].startswith("memory for") for c in data["checks"])


def test_repack_check_reads_the_choice_in_force(monkeypatch):
    import llama_cpp

    from labkit import repack
    decision = repack.decide()
    good = doctor.repack_check()
    assert good.ok and str(decision) in good.detail and "llama.cpp AMX kernels" in good.detail
    real = llama_cpp.llama_model_default_params

    def not_applied():          # as in a process that created its Llama before importing labkit
        params = real()
        params.use_extra_bufts = not decision.enabled
        return params
    monkeypatch.setattr(llama_cpp, "llama_model_default_params", not_applied)
    bad = doctor.repack_check()
    assert not bad.ok and "import labkit" in bad.fix


def test_llama_programs_check_reports_skew(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    server = tmp_path / "bin" / "llama-server"
    server.write_text("#!/bin/sh\necho 'version: 1 (abc1234)' >&2\n")
    server.chmod(0o755)
    (tmp_path / "LLAMA_CPP_PYTHON_VERSION").write_text("0.0.1\n")
    monkeypatch.setenv("LABKIT_LLAMA_CPP", str(tmp_path))
    c = doctor.llama_programs_check()
    assert not c.ok and not c.required and "0.0.1" in c.detail and "version: 1 (abc1234)" in c.detail


def test_engine_check_says_how_to_get_the_rpc_device(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_LLAMA_CPP", str(tmp_path))          # an empty build folder, and nothing on PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    from labkit import llama_tools
    monkeypatch.setattr(llama_tools, "REPO_ROOT", tmp_path)
    c = doctor.engine_check(engines.get("rpc"))
    assert not c.ok and not c.required and "make setup" in c.fix and "GGML_RPC" in c.fix
    (tmp_path / "bin").mkdir()
    device = tmp_path / "bin" / "ggml-rpc-server"
    device.write_text("#!/bin/sh\n")
    device.chmod(0o755)
    c = doctor.engine_check(engines.get("rpc"))
    assert c.ok and str(device) in c.detail
