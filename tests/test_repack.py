"""labkit.repack: the weight-repacking rule (llama.cpp's AMX crash) decided, applied and proven on
every engine path. The path tests run in a child process, so a native crash is a failed test with
its signal, not a dead pytest."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from labkit import repack

# /proc/cpuinfo "flags" lines of real CPUs (abridged to the features that matter here).
AMD_ZEN4 = "flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16\n"
INTEL_SPR = "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
INTEL_SKYLAKE = "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw\n"
ARM_GRAVITON = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve\n"
HERE_HAS_AMX = "amx_int8" in repack.cpu_flags()


@pytest.mark.parametrize("cpuinfo", [AMD_ZEN4, INTEL_SKYLAKE, ARM_GRAVITON, ""])
def test_repacking_stays_on_without_amx(cpuinfo):
    d = repack.decide(cpuinfo=cpuinfo, env={}, build_has_amx=True)
    assert d.enabled and "no AMX" in d.reason
    assert repack.llama_server_args(d) == [] and repack.llama_bench_args(d) == []


def test_amx_cpu_with_amx_build_turns_it_off():
    d = repack.decide(cpuinfo=INTEL_SPR, env={}, build_has_amx=True)
    assert not d.enabled and "#20824" in d.reason and "LABKIT_LLAMA_REPACK=1" in d.reason
    assert d.cpu_features == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    assert repack.llama_server_args(d) == ["--no-repack"]
    assert repack.llama_bench_args(d) == ["--repack", "0"]


def test_amx_cpu_with_a_build_without_amx_kernels_keeps_it():
    assert repack.decide(cpuinfo=INTEL_SPR, env={}, build_has_amx=False).enabled


@pytest.mark.parametrize("value, enabled", [("1", True), ("on", True), ("0", False), ("OFF", False), ("auto", False)])
def test_environment_overrides(value, enabled):
    d = repack.decide(cpuinfo=INTEL_SPR, env={repack.ENV_VAR: value}, build_has_amx=True)
    assert d.enabled is enabled
    assert repack.decide(cpuinfo=AMD_ZEN4, env={repack.ENV_VAR: "0"}).enabled is False


def test_bad_override_is_refused():
    with pytest.raises(ValueError, match="auto, 1 or 0"):
        repack.decide(cpuinfo=AMD_ZEN4, env={repack.ENV_VAR: "maybe"})


def _child(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def _describe(out: subprocess.CompletedProcess) -> str:
    sig = f" (signal {signal.Signals(-out.returncode).name})" if out.returncode < 0 else ""
    return f"exit {out.returncode}{sig}\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"


def test_import_labkit_applies_the_decision_in_process():
    out = _child("""
        import labkit, llama_cpp
        from labkit import repack
        print(llama_cpp.llama_model_default_params().use_extra_bufts, repack.decide().enabled)
    """)
    assert out.returncode == 0, _describe(out)
    in_force, decided = out.stdout.split()
    assert in_force == decided


# Every llama.cpp path the lab uses, each with a prompt of many tokens (one token never crashes).
EVERY_PATH = """
    import json, tempfile, pathlib
    import labkit
    from llama_cpp import Llama
    from labkit import bench, gguf as lg, memory, models, serve, quality as ev
    path = models.get("smollm2")
    prompt = "Explain in one sentence why the sky looks blue during the day."
    done = []
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    assert llm.create_completion(prompt, max_tokens=4)["usage"]["prompt_tokens"] > 8
    done.append("in-process Llama")
    assert bench.time_llama(llm, prompt, max_tokens=4).output_tokens > 0
    done.append("bench")
    toks = ev.tokenize(path, prompt * 4)[:40]
    assert ev.LlamaLogits(path, n_ctx=128, n_threads=2)(toks).shape[0] == len(toks)
    done.append("eval")
    with tempfile.TemporaryDirectory() as tmp:
        q = lg.quantize(path, pathlib.Path(tmp) / "q8.gguf", "Q8_0")
        assert ev.LlamaLogits(q, n_ctx=128, n_threads=2, resident=False)(toks).shape[0] == len(toks)
    done.append("ladder")
    assert memory.measure_rss(path, n_ctx=256, n_prompt=64, n_threads=2)["rss_delta"] > 0
    done.append("memory subprocess")
    with serve("llama.cpp", path) as srv:
        r = srv.openai().chat.completions.create(model=srv.model, max_tokens=4,
                                                 messages=[{"role": "user", "content": prompt}])
        assert r.usage.prompt_tokens > 8
    done.append("labkit.serve llama.cpp")
    with serve("ollama", path) as srv:
        import ollama
        r = ollama.Client(host=srv.base_url, timeout=120).generate(model=srv.model, prompt=prompt,
                                                            options={"num_predict": 4})
        assert r.prompt_eval_count > 8
    done.append("Ollama-compatible server")
    print(json.dumps(done))
"""


@pytest.mark.full     # every chapter runs multi-token prompts on these engines in make test
def test_multi_token_prompts_run_on_every_engine_path():
    out = _child(EVERY_PATH, timeout=600)
    assert out.returncode == 0, _describe(out)
    assert "Ollama-compatible server" in out.stdout


@pytest.mark.skipif(not HERE_HAS_AMX, reason="this CPU has no AMX: llama.cpp's AMX buffer is never used here")
def test_the_crash_is_real_when_repacking_is_forced_on_an_amx_cpu(smollm2_path):
    """Proves the rule is needed here: with repacking forced on, a multi-token decode dies."""
    if not repack.llama_build_has_amx():
        pytest.skip("this llama.cpp build has no AMX kernels")
    code = f"""
        import labkit
        from llama_cpp import Llama
        llm = Llama(model_path={str(smollm2_path)!r}, n_ctx=256, n_threads=2, verbose=False)
        llm.eval(llm.tokenize(b"The sky looks blue because of Rayleigh scattering."))
        print("survived")
    """
    forced = _child(code, env={repack.ENV_VAR: "1"})
    assert forced.returncode < 0 and "survived" not in forced.stdout, _describe(forced)
    safe = _child(code)
    assert safe.returncode == 0 and "survived" in safe.stdout, _describe(safe)
