"""llama.cpp's own programs: found (or a clear error), same source as the bindings, and
``labkit.serve("llama-server")`` supervised like the other engines."""
import subprocess
import urllib.error
import urllib.request

import psutil
import pytest

import labkit
from labkit import llama_tools, llamacpp_lab, repack
from labkit.errors import EngineNotInstalledError

try:
    llama_tools.program("llama-server")
    BUILT = True
except EngineNotInstalledError:
    BUILT = False
needs_programs = pytest.mark.skipif(not BUILT, reason="llama.cpp's programs are not built (make setup builds them)")


def test_missing_program_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_LLAMA_CPP", str(tmp_path))
    monkeypatch.setattr(llama_tools, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineNotInstalledError, match="make setup") as err:
        llama_tools.program("llama-bench")
    assert str(tmp_path / "bin") in str(err.value)
    with pytest.raises(ValueError, match="llama-server"):
        llama_tools.program("llama-cli-that-does-not-exist")


def test_version_skew_is_reported(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("LABKIT_LLAMA_CPP", str(tmp_path))
    (tmp_path / "LLAMA_CPP_PYTHON_VERSION").write_text("0.0.1\n")
    assert "0.0.1" in llama_tools.skew() and "make setup" in llama_tools.skew()


@needs_programs
def test_programs_come_from_the_bindings_source():
    assert llama_tools.skew() is None
    for name in llama_tools.PROGRAMS:
        assert llama_tools.program(name).is_file()
    assert llama_tools.version().startswith("version: ")
    argv, env = llama_tools.converter("convert_hf_to_gguf.py")
    out = subprocess.run(argv + ["--help"], capture_output=True, text=True, env={**__import__("os").environ, **env},
                         timeout=120, check=False)
    assert out.returncode == 0 and "--outtype" in out.stdout, out.stderr[-2000:]


@needs_programs
def test_llama_server_serves_batches_and_stops(smollm2_path):
    with labkit.serve("llama-server", smollm2_path, parallel=4, api_key="-sekret-with-a-leading-dash") as srv:
        assert srv.host == "127.0.0.1" and srv.command[0].endswith("llama-server")
        assert ("--no-repack" in srv.command) == (not repack.decide().enabled)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(srv.base_url + "/v1/models", timeout=10)
        assert denied.value.code == 401
        client = srv.openai()
        reply = client.chat.completions.create(model=srv.model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Name a colour. One word."}])
        assert reply.usage.prompt_tokens > 8 and reply.usage.completion_tokens > 0
        # four parallel slots: simultaneous streams are decoded together, so their tokens interleave
        run = llamacpp_lab.concurrent_streams(client, srv.model, ["Count to ten."] * 4, max_tokens=16)
        assert all(r["tokens"] > 0 for r in run["requests"]) and run["switches"] > 3, run
        family = [srv.pid] + [c.pid for c in psutil.Process(srv.pid).children(recursive=True)]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in family)


def test_llama_server_cell_runs_skips_or_demands(monkeypatch, tmp_path, capsys):
    from labkit import notebook
    if BUILT:
        ns = {}
        assert notebook.run_llama_server_cell("x = 1", ns) is True and ns["x"] == 1
    # a machine without the programs (Binder, Colab): skipped with the reason, unless CI demands them
    monkeypatch.setenv("LABKIT_LLAMA_CPP", str(tmp_path))
    monkeypatch.setattr(llama_tools, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("CI", "LABKIT_REQUIRE_LLAMA_SERVER"):
        monkeypatch.delenv(var, raising=False)
    ns = {}
    assert notebook.run_llama_server_cell("x = 1", ns) is False and "x" not in ns
    assert "Skipped: this cell needs llama.cpp's programs" in capsys.readouterr().out
    monkeypatch.setenv("CI", "1")
    with pytest.raises(EngineNotInstalledError, match="make setup"):
        notebook.run_llama_server_cell("x = 1", ns)


@pytest.mark.full     # chapter 03 (10c) builds the table in make test
@needs_programs
def test_speculation_table_reads_draft_counters_and_keeps_the_text(smollm2_path):
    """n-gram lookup on a copying task drafts and accepts tokens; the greedy text stays plain decoding's."""
    text = "The keeper lit the lamp, wound the clock, and wrote the weather in the log. " * 2
    tasks = {"copy": [{"role": "user", "content": "Repeat this text exactly:\n\n" + text}]}
    setups = {"plain": {}, "ngram": {"spec_type": "ngram-simple", "spec_ngram_simple_size_n": 4,
                                     "spec_ngram_simple_size_m": 16}}
    rows = {r["set-up"]: r for r in llamacpp_lab.speculation_table(smollm2_path, setups, tasks, max_tokens=32, repeats=1)}
    assert rows["plain"]["drafted"] == 0 and rows["plain"]["speed-up"] == 1.0
    assert rows["ngram"]["drafted"] > 0 and 0 < rows["ngram"]["accepted"] <= rows["ngram"]["drafted"], rows
    assert rows["ngram"]["same text as plain"] and rows["ngram"]["same start"] == rows["plain"]["same start"] == 1.0, rows
    with pytest.raises(ValueError, match="plain"):
        llamacpp_lab.speculation_table(smollm2_path, {"ngram": setups["ngram"]}, tasks)


def test_chat_with_timings_refuses_a_server_without_timings(smollm2_path):
    with labkit.serve("ollama", smollm2_path) as srv:
        with pytest.raises(ValueError, match="no `timings`"):
            llamacpp_lab.chat_with_timings(srv, [{"role": "user", "content": "Hi"}], max_tokens=2)


def test_convert_lora_names_the_failure(tmp_path):
    """A folder that is no PEFT adapter: the converter's own error comes back, nothing is written."""
    from labkit import models
    (tmp_path / "not-an-adapter").mkdir()
    with pytest.raises(RuntimeError, match="convert_lora_to_gguf.py failed"):
        llama_tools.convert_lora(tmp_path / "not-an-adapter", models.hf_folder("smollm2", dtype="float32"), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_convert_lora_writes_an_adapter_gguf(lora_adapter_gguf, smollm2_path):
    from labkit import gguf
    assert gguf.check_lora_adapter(lora_adapter_gguf, smollm2_path)["rank"] == 4


# The source documents' build lines (../shared/seeds 000, 003, 004), as a learner pastes them.
SEED_BUILD_LINES = {
    "LLAMA_METAL=1 make": "cmake -B build -DGGML_METAL=ON && cmake --build build --config Release -j",
    "make LLAMA_CUDA=1": "cmake -B build -DGGML_CUDA=ON && cmake --build build --config Release -j",
    "GGML\\_CUDA=1 make \\-j$(nproc) llama-server":
        "cmake -B build -DGGML_CUDA=ON && cmake --build build --config Release -j --target llama-server",
    "make -j": "cmake -B build && cmake --build build --config Release -j",
    "make clean": "rm -rf build",
    'CMAKE_ARGS="-DLLAMA_METAL=on" pip install llama-cpp-python': 'CMAKE_ARGS="-DGGML_METAL=on" pip install llama-cpp-python',
    "cmake -B build -DGGML_CUDA=ON": "cmake -B build -DGGML_CUDA=ON",
}


@pytest.mark.parametrize("old,new", SEED_BUILD_LINES.items())
def test_the_seeds_build_lines_become_todays_cmake(old, new):
    assert llama_tools.modern_build_command(old) == new


def test_a_line_that_is_not_a_build_is_refused():
    with pytest.raises(ValueError, match="not a make"):
        llama_tools.modern_build_command("ninja -C build")


def test_todays_option_names_are_the_ones_the_pinned_bindings_document():
    documented = llama_tools.documented_build_options()
    assert {"GGML_CUDA", "GGML_METAL", "GGML_VULKAN"} <= documented
    assert set(llama_tools.RENAMED_BUILD_OPTIONS.values()) <= documented
    assert not {"LLAMA_CUDA", "LLAMA_METAL", "LLAMA_CUBLAS"} & documented


def test_the_programs_own_parsers_judge_flags_without_loading_a_model(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello")
    assert llama_tools.parse_args("llama-completion", ["-m", "nowhere.gguf", "-f", str(prompt), "-no-cnv"]) == (True, "")
    ok, error = llama_tools.parse_args("llama-completion", ["-f", str(tmp_path / "missing.txt")])   # -f reads the file
    assert not ok and "missing.txt" in error
    ok, error = llama_tools.parse_args("llama-cli", ["-m", "nowhere.gguf", "--no-such-flag"])
    assert not ok and error == "error: invalid argument: --no-such-flag"
    ok, error = llama_tools.parse_args("llama-server", ["--color"])        # a flag that now takes a value
    assert not ok and "--color" in error


@pytest.mark.full
@pytest.mark.engine
def test_llama_cli_answers_two_turns_in_a_terminal_and_exits(smollm2_path):
    turns = llama_tools.cli_chat(smollm2_path, ["Name a colour.", "Another one?"], n_predict=8, threads=1)
    assert [t["message"] for t in turns] == ["Name a colour.", "Another one?"]
    assert all(t["reply"] and "Name a colour." not in t["reply"] and t["generation t/s"] > 0 for t in turns), turns
