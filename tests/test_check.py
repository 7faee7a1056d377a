"""Exercise checkers: each accepts the right answer and rejects typical wrong ones with a useful hint."""
import pytest

from labkit import memory
from labkit.check import EXERCISES, check


def test_kv_cache_exercise(capsys):
    assert check("00-kv-cache", 2**30)
    assert not check("00-kv-cache", 4 * 2**30) and "KV heads" in capsys.readouterr().out
    assert not check("00-kv-cache", 2**29) and "both K and V" in capsys.readouterr().out
    assert not check("00-kv-cache", "lots")


def test_weights_exercise(capsys):
    assert check("00-weights", memory.weights_bytes(7.62e9, "Q4_K_M") / 1e9)
    assert not check("00-weights", 3.81) and "not 4.0 bits" in capsys.readouterr().out


def test_paged_blocks_exercise(capsys):
    assert check("04-paged-blocks", 1 + 1 + 2 + 7)
    assert not check("04-paged-blocks", 0 + 1 + 1 + 6) and "round *up*" in capsys.readouterr().out


def test_decode_bound_exercise():
    assert check("06-decode-bound", 1008e9 / 4.9e9)
    assert not check("06-decode-bound", 85)


def test_fits_exercise(capsys):
    from labkit.troubleshoot import fit_report
    r = fit_report("smollm2", n_ctx=32768, available_bytes=0)
    assert check("07-fits", r.weights_bytes + r.kv_bytes)
    assert not check("07-fits", r.weights_bytes) and "weights alone" in capsys.readouterr().out


def test_fits_exercise_grades_against_the_chapters_model(monkeypatch, capsys):
    """Chapter 07 passes its model: the grader sizes that model, not SmolLM2 (a stand-in report, 1 GB + 2 GB)."""
    from types import SimpleNamespace

    from labkit import troubleshoot
    asked = []

    def fit_report(model, n_ctx, available_bytes):
        asked.append((model, n_ctx))
        return SimpleNamespace(weights_bytes=1e9, kv_bytes=2e9)
    monkeypatch.setattr(troubleshoot, "fit_report", fit_report)
    assert check("07-fits", 3e9, model="/models/other.gguf") and asked == [("/models/other.gguf", 32768)]
    assert not check("07-fits", 1e9, model="/models/other.gguf") and "weights alone" in capsys.readouterr().out
    assert check("07-fits", 3e9) and asked[-1] == ("smollm2", 32768)                # no model: the bundled one
    with pytest.raises(TypeError, match="not about a chapter's model"):
        check("06-decode-bound", 85, model="/models/other.gguf")


def test_ngl_exercise(capsys):
    # Worked by hand from labkit's parts: (24e9 - reserve - compute buffer) // (layer weights + layer KV)
    est = memory.estimate("Qwen2.5-32B", "Q4_K_M", 32768)
    cfg = memory.PRESETS["Qwen2.5-32B"]
    matrix = cfg.n_vocab * cfg.n_embd * est.weights_bytes / cfg.n_params
    per_layer = (est.weights_bytes - 2 * matrix + est.kv_bytes) / cfg.n_layers
    by_hand = int((24e9 - 2**30 - est.overhead_bytes) // per_layer)
    assert 0 < by_hand < cfg.n_layers          # a partial offload: the point of the exercise
    assert check("01-ngl", by_hand)
    assert not check("01-ngl", cfg.n_layers + 1) and "does not fit" in capsys.readouterr().out
    assert not check("01-ngl", by_hand // 2) and "per_layer_bytes" in capsys.readouterr().out
    assert not check("01-ngl", "all")


def test_unanswered_and_unknown(capsys):
    assert not check("00-kv-cache", ...) and "not answered yet" in capsys.readouterr().out
    with pytest.raises(KeyError):
        check("99-nope", 1)
    assert all(e.prompt and e.chapter for e in EXERCISES.values())


def _reference_q8_0(x):
    import numpy as np
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = amax / 127
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
    q = np.trunc(blocks * inv + np.copysign(0.5, blocks)).astype(np.int8)   # round half away from zero
    out = b""
    for scale, row in zip(d.astype(np.float16), q):
        out += scale.tobytes() + row.tobytes()
    return out


def test_q8_0_exercise(capsys):
    import numpy as np
    assert check("01-q8_0", _reference_q8_0)
    bankers = lambda x: _reference_q8_0(x)[:-1] + b"\x00"          # noqa: E731  (wrong last byte)
    assert not check("01-q8_0", bankers) and "different bytes" in capsys.readouterr().out
    assert not check("01-q8_0", lambda x: x.astype(np.int8).tobytes()) and "bytes instead of" in capsys.readouterr().out
    assert not check("01-q8_0", b"not a function") and "function itself" in capsys.readouterr().out


def test_small_numeric_exercises(capsys):
    assert check("01-bpw-q4k", 4.5) and not check("01-bpw-q4k", 4.0)
    assert check("02-tokens-per-s", 80.0)
    assert not check("02-tokens-per-s", 128 / 1_600_000) and "nanoseconds" in capsys.readouterr().out
    assert check("03-kv-q8", 2 * 30 * 3 * 64 * 4096 * 1.0625)
    assert not check("03-kv-q8", 2 * 30 * 3 * 64 * 4096 * 2) and "f16" in capsys.readouterr().out
    assert check("05-recall", 2 / 3) and not check("05-recall", 0.5)


def test_modelfile_exercise(capsys):
    good = 'FROM smollm2:135m\nSYSTEM """You are a terse pirate."""\nPARAMETER temperature 0.2\n'
    assert check("02-modelfile", good)
    assert not check("02-modelfile", "FROM smollm2:135m\nPARAMETER temperature 0.2") and "SYSTEM" in capsys.readouterr().out
    assert not check("02-modelfile", "FROM x\nFLY away") and "refused" in capsys.readouterr().out


BROKEN_SITE = """
server {
    listen 127.0.0.1:8081;
    limit_req_zone $binary_remote_addr zone=chat:1m rate=5r/s;
    location / {
        limit_req zone=chat burst=10 nodelay;
        proxy_pass http://127.0.0.1:8080;
        proxy_http_version 1.1;
    }
}
"""
FIXED_SITE = """
limit_req_zone $binary_remote_addr zone=chat:1m rate=5r/s;
server {
    listen 127.0.0.1:8081;
    location / {
        limit_req zone=chat burst=10 nodelay;
        proxy_pass http://127.0.0.1:8080;
        proxy_http_version 1.1;
        proxy_buffering off;
    }
}
"""


def test_nginx_site_exercise_is_graded_by_nginx(capsys):
    from labkit import proxy
    from labkit.errors import EngineNotInstalledError
    try:
        proxy.nginx_binary()
    except EngineNotInstalledError:
        pytest.skip("nginx is not installed")
    assert not check("08-nginx-site", BROKEN_SITE) and "nginx -t refuses it" in capsys.readouterr().out
    moved = BROKEN_SITE.replace("    limit_req_zone $binary_remote_addr zone=chat:1m rate=5r/s;\n", "")
    moved = "limit_req_zone $binary_remote_addr zone=chat:1m rate=5r/s;\n" + moved
    assert not check("08-nginx-site", moved) and "proxy_buffering off" in capsys.readouterr().out
    assert not check("08-nginx-site", FIXED_SITE.replace("127.0.0.1:8081", "0.0.0.0:8081")) and "loopback" in capsys.readouterr().out
    assert not check("08-nginx-site", FIXED_SITE.replace("        limit_req zone=chat burst=10 nodelay;\n", "")) \
        and "applies it" in capsys.readouterr().out
    assert check("08-nginx-site", FIXED_SITE)


def test_employee_id_exercise_grades_functions(capsys):
    import re
    assert check("09-employee-id", lambda t: re.search(r"\b[A-Z]{3}-\d{6}\b", t) is not None)
    assert not check("09-employee-id", lambda t: re.search(r"[A-Z]{3}-\d{6}", t) is not None)   # no boundaries
    assert "XEMP-123456" in capsys.readouterr().out
    assert not check("09-employee-id", lambda t: None)                                        # the ... stub
    assert "returns None" in capsys.readouterr().out
    assert not check("09-employee-id", "EMP-123456")
    assert "the function itself" in capsys.readouterr().out


GOOD_LLAMA_SERVER = ("llama-server -m /models/Qwen2.5-7B-Instruct-Q4_K_M.gguf -ngl 99 -c 16384 -np 4 "
                     "--port 8081 --api-key lab-secret")


@pytest.mark.parametrize("answer", [
    GOOD_LLAMA_SERVER,
    "./.llama.cpp/bin/llama-server \\\n  --model /models/Qwen2.5-7B-Instruct-Q4_K_M.gguf --n-gpu-layers all \\\n"
    "  --ctx-size 16384 --parallel 4 --host 127.0.0.1 --port 8081 --api-key lab-secret --jinja",
])
def test_llama_server_exercise_accepts_the_spellings_llama_server_accepts(answer):
    assert check("03-llama-server", answer)


@pytest.mark.parametrize("change, words", [
    (("llama-server", "python -m llama_cpp.server"), "llama-cpp-python's Python server"),
    (("-c 16384", "--n_ctx 16384"), "flags use dashes"),
    (("-ngl 99", "-ngl 20"), "28 layers"),
    (("-ngl 99 ", ""), "auto"),
    (("-c 16384", "-c 4096"), "all slots together"),
    (("-np 4 ", ""), "4 slots"),
    (("--port 8081", "--host 0.0.0.0 --port 8081"), "every interface"),
    (("--port 8081 ", ""), "--port 8081"),
    ((" --api-key lab-secret", ""), "--api-key lab-secret"),
    (("--port", "--jinja --no-jinja --port"), "--no-jinja"),
    (("--port", "--prot"), "not one of the flags"),
])
def test_llama_server_exercise_names_each_mistake(change, words, capsys):
    assert not check("03-llama-server", GOOD_LLAMA_SERVER.replace(*change))
    assert words in capsys.readouterr().out


def test_llama_server_exercise_flags_are_the_built_programs():
    """Every spelling the grader accepts is one the lab's llama-server lists in --help."""
    import subprocess

    from conftest import installed_or_skip

    from labkit import llama_tools
    from labkit.check import LLAMA_SERVER_FLAGS
    from labkit.notebook import llama_server_required
    binary = installed_or_skip(lambda: llama_tools.program("llama-server"), llama_server_required(), "llama-server")
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    listed = set(help_text.replace(",", " ").split())
    assert not [flag for flag in LLAMA_SERVER_FLAGS if flag not in listed], help_text[:400]


def test_stream_timing_exercise_names_each_mistake(capsys):
    def right(arrivals, tokens):
        span = arrivals[-1] - arrivals[0]
        return arrivals[0], (tokens - 1) / span if tokens > 1 and span > 0 else float("nan")

    def counts_chunks(arrivals, tokens):
        return right(arrivals, len(arrivals))

    def includes_prefill(arrivals, tokens):
        return arrivals[0], tokens / arrivals[-1]

    def divides_by_zero(arrivals, tokens):
        return arrivals[0], (tokens - 1) / (arrivals[-1] - arrivals[0])

    assert check("06-stream-timing", right)
    for wrong, words in ((counts_chunks, "not chunks"), (includes_prefill, "belongs to prefill"),
                         (divides_by_zero, "ZeroDivisionError"), (lambda a, t: (0.0, 1.0), "TTFT"), (3.0, "the function itself")):
        assert not check("06-stream-timing", wrong)
        assert words in capsys.readouterr().out


def test_stream_timing_exercise_before_it_is_written(capsys):
    def stream_timing(arrivals, output_tokens):
        ...
    assert not check("06-stream-timing", stream_timing)
    assert "returns nothing yet" in capsys.readouterr().out


GOOD_VLLM_SERVE = ("vllm serve Qwen/Qwen2.5-7B-Instruct-AWQ --max-model-len 16384 --max-num-seqs 8 "
                   "--gpu-memory-utilization 0.85 --host 127.0.0.1 --port 8000 --api-key lab-secret")


@pytest.mark.parametrize("answer", [
    GOOD_VLLM_SERVE,
    "vllm serve \\\n  Qwen/Qwen2.5-7B-Instruct-AWQ --max_model_len=16384 --max-num-seqs 8 \\\n"
    "  --gpu-memory-utilization=0.85 --host localhost --port 8000 --api-key lab-secret",
])
def test_vllm_serve_exercise_accepts_the_spellings_vllm_accepts(answer):
    assert check("04-vllm-serve", answer)


@pytest.mark.parametrize("change, words", [
    (("vllm serve Qwen/Qwen2.5-7B-Instruct-AWQ", "python -m vllm.entrypoints.openai.api_server --model "
      "Qwen/Qwen2.5-7B-Instruct-AWQ"), "deprecated"),
    (("serve Qwen", "serve --model Qwen"), "first argument"),
    (("--port", "--disable-log-requests --port"), "is gone"),
    (("--port", "--quantization awq --port"), "Marlin"),
    (("0.85", "85"), "a fraction"),
    (("--host 127.0.0.1 ", ""), "every interface"),
    (("127.0.0.1", "0.0.0.0"), "every interface"),
    (("--max-model-len 16384 ", ""), "16384"),
    (("--max-num-seqs 8", "--max-num-seqs 256"), "--max-num-seqs 8"),
    ((" --api-key lab-secret", ""), "no authentication"),
    (("--port", "--speculative-model x --port"), "not one of the flags"),
])
def test_vllm_serve_exercise_names_each_mistake(change, words, capsys):
    assert not check("04-vllm-serve", GOOD_VLLM_SERVE.replace(*change))
    assert words in capsys.readouterr().out


def test_vllm_serve_exercise_flags_and_the_vision_command_are_the_installed_vllms():
    """Every flag the grader accepts is one the installed vLLM's own argument parser defines, and the flag the
    grader calls gone really is; chapter 04's vision command parses (its JSON values too), and a misspelled
    flag or a value that is not JSON is reported. One run of the parser: importing vLLM takes seconds."""
    import shlex

    from conftest import installed_or_skip

    from labkit.check import VLLM_SERVE_FLAGS, vllm_serve_parse
    from labkit.notebook import vllm_required
    from labkit.servers import vllm_python
    from labkit.vision import VISION_COMMANDS
    installed_or_skip(vllm_python, vllm_required(), "vLLM")
    vision = shlex.split(VISION_COMMANDS["vllm"])[2:]
    misspelled = [w.replace("--limit-mm-per-prompt", "--limit-mm-per-promt") for w in vision]
    not_json = [w.replace('{"image": 2}', "{image: 2}") for w in vision]
    defined, (ok, bad_flag, bad_value) = vllm_serve_parse([vision, misspelled, not_json])
    assert not [flag for flag in VLLM_SERVE_FLAGS if flag not in defined]
    assert "--model" in defined and "--disable-log-requests" not in defined
    assert ok["ok"], ok["error"]
    assert ok["values"] == {"max_model_len": 8192, "limit_mm_per_prompt": {"image": 2},
                            "mm_processor_kwargs": {"max_pixels": 1003520}}, ok
    assert not bad_flag["ok"] and "unrecognized arguments: --limit-mm-per-promt" in bad_flag["error"], bad_flag
    assert not bad_value["ok"] and "--limit-mm-per-prompt" in bad_value["error"], bad_value


def test_the_vision_llama_server_command_passes_its_own_parser():
    """Chapter 04's llama-server command with a projector, through the built llama-server's parser (milliseconds:
    nothing is loaded); a misspelled flag and a missing value are reported with llama.cpp's own error."""
    from conftest import installed_or_skip

    from labkit import llama_tools
    from labkit.check import command_verdicts
    from labkit.notebook import llama_server_required
    from labkit.vision import VISION_COMMANDS
    installed_or_skip(lambda: llama_tools.program("llama-server"), llama_server_required(), "llama-server")
    command = VISION_COMMANDS["llama-server"]
    assert "--mmproj" in command
    verdicts = command_verdicts([command, command.replace("--mmproj", "--mmprj"), command.replace(" 1280", "")])
    assert verdicts[0] == (True, ""), verdicts[0]
    assert verdicts[1] == (False, "error: invalid argument: --mmprj"), verdicts[1]
    assert not verdicts[2][0] and "--image-max-tokens" in verdicts[2][1], verdicts[2]
    with pytest.raises(ValueError, match="only llama-server and vllm serve"):
        command_verdicts(["ollama serve"])


def test_rrf_exercise_names_each_mistake(capsys):
    def rrf(rankings, k=60, start=1, best_first=True):
        scores = {}
        for ranking in rankings:
            for rank, item in enumerate(ranking, start):
                scores[item] = scores.get(item, 0.0) + 1 / (k + rank)
        return sorted(scores, key=scores.get, reverse=best_first)

    assert check("05-rrf", rrf)
    assert not check("05-rrf", lambda r, k=60: rrf(r, k, start=0))
    assert "ranks start at 1" in capsys.readouterr().out
    assert not check("05-rrf", lambda r, k=60: rrf(r, k, best_first=False))
    assert "best first" in capsys.readouterr().out
    assert not check("05-rrf", lambda r, k=60: max(r, key=len))                 # no fusion at all
    assert "expected" in capsys.readouterr().out
    assert not check("05-rrf", lambda r, k=60: None)
    assert "returns None" in capsys.readouterr().out


def test_quant_ngl_exercise_is_graded_by_the_offload_planner(capsys):
    from labkit.check import QUANT_NGL_TASK
    from labkit.memory import gpu_layers
    plans = {q: gpu_layers(QUANT_NGL_TASK["model"], QUANT_NGL_TASK["vram_bytes"], q, n_ctx=QUANT_NGL_TASK["n_ctx"])
             for q in QUANT_NGL_TASK["choices"]}
    fits = [q for q in QUANT_NGL_TASK["choices"] if plans[q].fully_offloaded]
    best, too_big = fits[0], QUANT_NGL_TASK["choices"][QUANT_NGL_TASK["choices"].index(fits[0]) - 1]
    assert best == "Q4_K_M" and plans[best].ngl == 49      # the planner's answer this exercise is written around
    assert check("07-quant-ngl", (best, plans[best].ngl)) and check("07-quant-ngl", ("q4_k_m", 99))
    assert not check("07-quant-ngl", (too_big, 99))
    assert "layers fit" in capsys.readouterr().out
    assert not check("07-quant-ngl", (fits[1], 99))
    assert "more precise" in capsys.readouterr().out
    assert not check("07-quant-ngl", (best, plans[best].n_layers))
    assert "output layer" in capsys.readouterr().out
    assert not check("07-quant-ngl", "Q4_K_M")
    assert "a pair" in capsys.readouterr().out


def test_answer_labels_exercise_names_each_mistake(capsys):
    from labkit.finetune import answer_labels
    assert answer_labels([1, 2], [1, 2, 7, 8, 0, 5], 0) == ([1, 2, 7, 8, 0], [-100, -100, 7, 8, 0])
    assert check("10-answer-labels", answer_labels)
    assert not check("10-answer-labels", lambda p, f, e: (f, list(f)))                         # prompt not masked
    assert "mask the prompt" in capsys.readouterr().out
    assert not check("10-answer-labels", lambda p, f, e: (f, [-100] * len(p) + f[len(p):]))    # nothing cut
    assert "cut after the first end-of-turn" in capsys.readouterr().out

    def drops_end(p, f, e):
        ids, labels = answer_labels(p, f, e)
        return ids, [x if x != e or i < len(p) else -100 for i, x in enumerate(labels)]
    assert not check("10-answer-labels", drops_end)
    assert "keep the end-of-turn token" in capsys.readouterr().out
