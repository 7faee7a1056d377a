"""labkit.compile_cache: torch.compile cold vs warm. The parsing, the cache inventory, the environment and the
errors run on fixtures; one real cold/warm pair (two fresh processes, ~10-20 s on 2 cores) is in make test-full,
since chapter 04 runs the same pair in make test."""
import json
import subprocess

import pytest

from labkit import compile_cache as cc

COLD = {"eager_s": 0.12, "first_call_s": 6.4, "steady_s": 0.01, "fx_graph_hits": 0, "fx_graph_misses": 1,
        "aot_autograd_hits": 0, "aot_autograd_misses": 1, "max_abs_diff": 4.8e-07}
WARM = {**COLD, "first_call_s": 1.1, "fx_graph_hits": 1, "fx_graph_misses": 0, "aot_autograd_hits": 1,
        "aot_autograd_misses": 0}


def test_the_workers_last_line_is_its_result():
    run = cc.parse_worker_output(0, "a warning on stdout\n" + json.dumps(COLD) + "\n", "")
    assert run == cc.Run(**COLD)


@pytest.mark.parametrize("returncode, stdout", [(1, ""), (0, ""), (-9, json.dumps(COLD))])
def test_a_failed_worker_is_an_error_that_shows_its_output(returncode, stdout):
    with pytest.raises(cc.CompileWorkerError, match="C\\+\\+ compiler") as err:
        cc.parse_worker_output(returncode, stdout, "torch._inductor.exc.InductorError: CppCompileError: g++ not found")
    assert "exited with" in str(err.value) and ("g++ not found" in str(err.value) or returncode == 0)


def test_inventory_counts_the_graph_caches_and_generated_code_by_kind(tmp_path):
    (tmp_path / "fxgraph" / "ab" / "key").mkdir(parents=True)
    (tmp_path / "fxgraph" / "ab" / "key" / "entry").write_bytes(b"x" * 10)
    (tmp_path / "aotautograd" / "k").mkdir(parents=True)
    (tmp_path / "aotautograd" / "k" / "entry").write_bytes(b"y" * 5)
    (tmp_path / "c7").mkdir()
    (tmp_path / "c7" / "kernel.cpp").write_text("int f();")
    (tmp_path / "c7" / "kernel.so").write_bytes(b"\0" * 100)
    assert cc.cache_inventory(tmp_path) == {"fxgraph": (1, 10), "aotautograd": (1, 5), ".cpp": (1, 8),
                                            ".so": (1, 100)}
    assert cc.cache_inventory(tmp_path / "absent") == {}


def test_worker_environment_points_at_the_cache_and_keeps_the_callers_switches(tmp_path):
    env = cc.worker_environment(tmp_path, {"PATH": "/bin", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"})
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path) and env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    assert cc.caches_turned_off(env) == ["TORCHINDUCTOR_FX_GRAPH_CACHE"]
    assert cc.caches_turned_off({"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}) == ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"]
    assert cc.caches_turned_off({"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}) == []


def test_measure_runs_cold_then_warm_on_one_cache_and_refuses_a_used_one(tmp_path, monkeypatch):
    seen = []

    def fake_run(argv, capture_output, text, timeout, env):
        seen.append(env["TORCHINDUCTOR_CACHE_DIR"])
        (tmp_path / "cache" / "fxgraph").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache" / "fxgraph" / f"entry{len(seen)}").write_text("graph")
        return subprocess.CompletedProcess(argv, 0, json.dumps(COLD if len(seen) == 1 else WARM), "")

    monkeypatch.setattr(cc.subprocess, "run", fake_run)
    result = cc.measure(tmp_path / "cache")
    assert seen == [str(tmp_path / "cache")] * 2
    assert result.cold.fx_graph_misses == 1 and result.warm.fx_graph_hits == 1
    assert result.cache_after_cold == {"fxgraph": (1, 5)} and result.cache_after_warm == {"fxgraph": (2, 10)}
    assert result.files_written == 1 and result.saved_s == pytest.approx(5.3) and result.speedup > 5
    with pytest.raises(ValueError, match="not empty"):
        cc.measure(tmp_path / "cache")


@pytest.mark.full      # two fresh processes compiling with the C++ compiler; chapter 04 runs the same in make test
@pytest.mark.engine
def test_a_second_process_hits_the_cache_the_first_one_filled(tmp_path):
    result = cc.measure(tmp_path / "cache")
    assert result.cold.fx_graph_misses >= 1 and result.cold.fx_graph_hits == 0
    assert result.warm.fx_graph_hits >= 1 and result.warm.aot_autograd_hits >= 1
    assert result.files_written > 0 and result.warm.first_call_s < result.cold.first_call_s
    assert max(result.cold.max_abs_diff, result.warm.max_abs_diff) < 1e-4


@pytest.mark.full
@pytest.mark.engine
def test_with_the_graph_caches_off_the_second_process_hits_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    result = cc.measure(tmp_path / "cache")
    assert result.warm.fx_graph_hits == 0 and result.warm.aot_autograd_hits == 0
