"""Instant feedback for the exercises at the end of each chapter.

``check(exercise_id, answer)`` prints a pass/fail line — with a hint aimed at the most common
mistake when it fails — and returns True/False. Expected values are computed by the same labkit
functions the chapter taught, never typed in.

>>> check("00-kv-cache", 2**30)
✅ 00-kv-cache: correct.
True
>>> check("00-kv-cache", 4 * 2**30)
❌ 00-kv-cache: 4× too large — count KV heads (8), not attention heads (32): grouped-query attention shares each KV head.
False
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Exercise:
    id: str
    chapter: str
    prompt: str
    grade: Callable[[Any], tuple[bool, str]]     # answer → (passed, hint when failed)


def _close(answer, expected, rel=0.01) -> bool:
    try:
        return math.isclose(float(answer), float(expected), rel_tol=rel)
    except (TypeError, ValueError):
        return False


def _kv_cache(answer):
    from .memory import REFERENCE_MODELS
    llama = next(a for a in REFERENCE_MODELS if a.name == "Llama-3.1-8B")
    expected = llama.kv_cache_bytes(8192)
    if _close(answer, expected):
        return True, ""
    if _close(answer, expected * llama.n_heads / llama.n_kv_heads):
        return False, (f"{llama.n_heads // llama.n_kv_heads}× too large — count KV heads ({llama.n_kv_heads}), not attention "
                       f"heads ({llama.n_heads}): grouped-query attention shares each KV head.")
    if _close(answer, expected / 2):
        return False, "half the answer — remember both K and V are cached (the factor 2)."
    return False, "bytes = 2 × layers × KV heads × head_dim × n_ctx × 2 bytes (f16). Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128."


def _weights(answer):
    from .memory import weights_bytes
    expected = weights_bytes(7.62e9, "Q4_K_M") / 1e9
    if _close(answer, expected, rel=0.02):
        return True, ""
    if _close(answer, 7.62e9 * 4 / 8 / 1e9, rel=0.02):
        return False, "Q4_K_M is not 4.0 bits per weight: its mix keeps some tensors at higher precision (≈ 4.89 bpw on average)."
    return False, "GB = parameters × bits-per-weight ÷ 8 ÷ 1e9 (labkit.memory.bits_per_weight('Q4_K_M'))."


def _paged_blocks(answer):
    lengths, block = [5, 16, 17, 100], 16
    expected = sum(-(-n // block) for n in lengths)
    if answer == expected:
        return True, ""
    if answer == sum(n // block for n in lengths):
        return False, "a partly filled block is still a whole block: round *up* (ceil), not down."
    return False, f"blocks per sequence = ceil(length ÷ {block}); add them up."


def _decode_bound(answer):
    from .bench import decode_bound
    expected = decode_bound(1008e9, 4.9e9)         # RTX 4090 bandwidth, 8B Q4_K_M weights
    if _close(answer, expected, rel=0.02):
        return True, ""
    return False, "tokens/s ≤ bandwidth (bytes/s) ÷ bytes read per token (all the weights, once per token)."


def _ngl(answer):
    from .memory import gpu_layers
    plan = gpu_layers("Qwen2.5-32B", 24e9, "Q4_K_M", n_ctx=32768)
    try:
        value = int(answer)
    except (TypeError, ValueError):
        return False, "answer with a whole number: the -ngl value."
    if abs(value - plan.ngl) <= 1:
        return True, ""
    if value >= plan.n_layers:
        return False, (f"the whole model does not fit: weights + KV cache ≈ {plan.gpu_bytes + plan.cpu_bytes:.3g} bytes > 24 GB. "
                       "Count how many per-layer slices (weights + that layer's KV) fit after the reserve and compute buffer.")
    return False, ("-ngl moves the output layer first, then whole layers: 1 + (VRAM − 1 GiB reserve − compute buffer − "
                   "output layer) ÷ (one layer's weights + its KV cache); memory.gpu_layers(...).per_layer_bytes gives the slice.")


def _fits(answer, model=None):
    from .troubleshoot import fit_report
    report = fit_report(model or "smollm2", n_ctx=32768, available_bytes=0)   # the chapter's model (default SmolLM2)
    expected = report.weights_bytes + report.kv_bytes
    if _close(answer, expected, rel=0.02):
        return True, ""
    if _close(answer, report.weights_bytes, rel=0.02):
        return False, "that is the weights alone — add the KV cache for 32768 tokens."
    return False, "weights (sum of the GGUF's tensor sizes) + KV cache (labkit.memory.from_gguf(...).kv_cache_bytes(32768))."


def _q8_0(answer):
    """``answer`` is the learner's function ``f(x: np.ndarray) -> bytes`` (one row, length % 32 == 0)."""
    import numpy as np

    from .quant import quantize
    if not callable(answer):
        return False, "pass your function itself, e.g. check('01-q8_0', my_q8_0), not its result."
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=64).astype(np.float32), np.zeros(32, np.float32),
             np.linspace(-3, 3, 96).astype(np.float32)]
    for x in cases:
        try:
            got = answer(x.copy())
            if got is None:
                return False, "your function returns nothing yet: build and return the bytes."
            got = bytes(got)
        except Exception as exc:   # the learner's code: report, don't crash the notebook
            return False, f"your function raised {type(exc).__name__}: {exc}"
        want = quantize(x, "Q8_0")
        if got != want:
            if len(got) != len(want):
                return False, (f"{len(got)} bytes instead of {len(want)}: each block of 32 values is a float16 scale "
                               "(2 bytes) followed by 32 int8 values.")
            return False, ("same size, different bytes: scale d = max|x| / 127 stored as float16, q = round(x / d) "
                           "(round half away from zero, as np.round does not), and d = 0 for an all-zero block.")
    return True, ""


def _bpw_q4_k(answer):
    from .quant import bits_per_weight
    if _close(answer, bits_per_weight("Q4_K"), rel=1e-9):
        return True, ""
    if _close(answer, 4.0, rel=1e-9):
        return False, ("4 bits for the values, plus the scales: a 256-value super-block also stores "
                       "2 float16s and 12 bytes of 6-bit scales/mins.")
    return False, "bits per weight = bytes per block × 8 ÷ values per block (Q4_K: 144 bytes per 256 values)."


def _tokens_per_s(answer):
    expected = 128 / (1_600_000_000 / 1e9)
    if _close(answer, expected):
        return True, ""
    if _close(answer, 128 / 1_600_000_000) or _close(answer, 128 / 1_600_000):
        return False, "Ollama's durations are in nanoseconds: divide eval_duration by 1e9 to get seconds."
    return False, "tokens/s = eval_count ÷ (eval_duration in seconds)."


def _modelfile(answer):
    from .modelfile import ModelfileError, parse
    try:
        mf = parse(str(answer))
    except ModelfileError as exc:
        return False, f"the parser refused it: {exc}"
    if not mf.from_:
        return False, "a Modelfile needs FROM (the base model, e.g. FROM smollm2:135m)."
    if not mf.system:
        return False, 'add a SYSTEM instruction with the persona, e.g. SYSTEM """You are a pirate."""'
    if mf.parameters.get("temperature") is None:
        return False, "add PARAMETER temperature 0.2 (parameters are lower-case: PARAMETER name value)."
    return True, ""


def _kv_q8(answer):
    from .memory import kv_cache_bytes
    expected = kv_cache_bytes(30, 3, 64, 4096, "q8_0")
    if _close(answer, expected):
        return True, ""
    if _close(answer, kv_cache_bytes(30, 3, 64, 4096, "f16")):
        return False, "that is the f16 size: q8_0 stores 34 bytes per 32 values (1.0625 bytes per element)."
    if _close(answer, kv_cache_bytes(30, 9, 64, 4096, "q8_0")):
        return False, "3× too large — SmolLM2 has 3 KV heads (9 attention heads share them)."
    return False, "2 × 30 layers × 3 KV heads × 64 × 4096 tokens × 1.0625 bytes."


def _recall(answer):
    from .rag import recall_at_k
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "d"], ["d", "a", "c"]]
    gold = ["a", "a", "a", None]
    expected = recall_at_k(rankings, gold, k=2)
    if _close(answer, expected, rel=1e-6):
        return True, ""
    if _close(answer, 2 / 4, rel=1e-6):
        return False, "leave out the unanswerable question (gold None): recall is over answerable questions only."
    return False, "recall@2 = share of answerable questions whose gold id is among the first 2 retrieved."


def _nginx_site(answer):
    """``answer``: nginx site text (what sites-enabled/ holds) fronting 127.0.0.1:8080 for streaming chat."""
    import re

    from .errors import EngineNotInstalledError
    from .proxy import nginx_test, site_config
    text = str(answer)
    try:
        ok, message = nginx_test(site_config(text))
    except EngineNotInstalledError as exc:
        return False, f"grading needs nginx, to run nginx -t on your config: {exc}"
    if not ok:
        return False, f"nginx -t refuses it: {message.splitlines()[0]}"
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())     # directives only, not comments
    server = code[code.find("server"):] if re.search(r"\bserver\s*\{", code) else ""
    if not re.search(r"limit_req_zone[^;]*rate=5r/s", code):
        return False, "limit requests to 5 per second per client: limit_req_zone $binary_remote_addr zone=NAME:1m rate=5r/s;"
    if "limit_req_zone" in server:
        return False, "limit_req_zone belongs in http {} (before server {}), not inside server {}."
    if not re.search(r"limit_req\s+zone=\w+", server):
        return False, "the zone does nothing until a location applies it: limit_req zone=NAME burst=10 nodelay;"
    if not re.search(r"proxy_buffering\s+off", server):
        return False, "a token stream must not wait in nginx's buffers: proxy_buffering off;"
    if not re.search(r"proxy_pass\s+http://127\.0\.0\.1:8080", server):
        return False, "send requests to the engine: proxy_pass http://127.0.0.1:8080;"
    if not re.search(r"listen\s+127\.0\.0\.1:\d+", server):
        return False, "listen on loopback only (listen 127.0.0.1:PORT;): the proxy's own port is opened on purpose, later."
    return True, ""


# llama-server's flags for exercise 03-llama-server (spellings from `llama-server --help` of the pinned build)
LLAMA_SERVER_FLAGS = {"-m": "model", "--model": "model", "-c": "ctx", "--ctx-size": "ctx", "-ngl": "ngl",
                      "--gpu-layers": "ngl", "--n-gpu-layers": "ngl", "-np": "parallel", "--parallel": "parallel",
                      "--host": "host", "--port": "port", "--api-key": "api_key", "--jinja": "jinja", "--no-jinja": "no_jinja"}
LLAMA_SERVER_TASK = {"model": "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", "ctx": "16384", "parallel": "4", "port": "8081",
                     "api_key": "lab-secret"}


def _shell_words(answer) -> tuple[list[str], str]:
    """A command line split as the shell would (backslash-newline continuations joined), or a hint."""
    import shlex
    try:
        return shlex.split(str(answer).replace("\\\n", " ")), ""
    except ValueError as exc:
        return [], f"the shell could not split it: {exc} (an unclosed quote?)"


def _llama_server_args(answer) -> tuple[dict, str]:
    """The flags of a llama-server command line (canonical names) and a hint when it cannot be read."""
    words, hint = _shell_words(answer)
    if hint:
        return {}, hint
    if not words or not words[0].endswith("llama-server"):
        if "llama_cpp.server" in words:
            return {}, "that is llama-cpp-python's Python server; the exercise asks for llama.cpp's own program, llama-server."
        return {}, "start with the program: llama-server (or its path, e.g. .llama.cpp/bin/llama-server)."
    args, i = {}, 1
    while i < len(words):
        word = words[i]
        if word in ("--jinja", "--no-jinja"):
            args[LLAMA_SERVER_FLAGS[word]] = True
        elif word in LLAMA_SERVER_FLAGS and i + 1 < len(words):
            args[LLAMA_SERVER_FLAGS[word]] = words[i + 1]
            i += 1
        elif "_" in word and word.startswith("--"):
            return {}, (f"{word} is a llama-cpp-python server spelling; llama-server's flags use dashes "
                        "(-c/--ctx-size, -ngl/--n-gpu-layers).")
        else:
            return {}, f"{word!r} is not one of the flags this task needs (llama-server --help lists them all)."
        i += 1
    return args, ""


def _llama_server(answer):
    """``answer``: the shell command that serves the task's model with llama-server."""
    from .memory import REFERENCE_MODELS
    args, hint = _llama_server_args(answer)
    if hint:
        return False, hint
    layers = next(m for m in REFERENCE_MODELS if m.name == "Qwen2.5-7B").n_layers
    if args.get("model") != LLAMA_SERVER_TASK["model"]:
        return False, f"load the model with -m {LLAMA_SERVER_TASK['model']}."
    ngl = args.get("ngl", "")
    if not (ngl == "all" or (ngl.isdigit() and int(ngl) >= layers)):
        return False, (f"every layer on the GPU: -ngl all (or a number ≥ the model's {layers} layers, e.g. 99); "
                       "the default, auto, offloads only what it decides fits.")
    if args.get("ctx") != LLAMA_SERVER_TASK["ctx"]:
        return False, "-c sets the context for all slots together: -c 16384 (with -np 4)."
    if args.get("parallel") != LLAMA_SERVER_TASK["parallel"]:
        return False, "4 requests at once need 4 slots: -np 4 (--parallel 4)."
    if args.get("host", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1"):
        return False, f"--host {args['host']} listens on every interface; only this machine: leave --host out (127.0.0.1)."
    if args.get("port") != LLAMA_SERVER_TASK["port"]:
        return False, "the port: --port 8081 (the default is 8080)."
    if args.get("api_key") != LLAMA_SERVER_TASK["api_key"]:
        return False, "requests must carry a key: --api-key lab-secret."
    if args.get("no_jinja"):
        return False, "--no-jinja drops the model's own (Jinja) chat template; leave it out (Jinja is the default)."
    return True, ""


# (arrival of each streamed chunk in seconds after the request was sent, output tokens from the engine's usage)
STREAM_TIMING_CASES = [([0.80, 0.85, 0.90, 0.95, 1.00], 5), ([0.5, 0.9, 1.3], 9), ([0.30, 0.42, 0.61, 0.70], 4), ([0.25], 1)]


def _stream_timing(answer):
    """``answer``: a function (arrivals, output_tokens) -> (ttft_s, decode_tokens_per_s)."""
    from .streams import RequestTiming
    if not callable(answer):
        return False, "pass the function itself (stream_timing), not its result."
    for arrivals, tokens in STREAM_TIMING_CASES:
        want = RequestTiming(ttft=arrivals[0], e2e=arrivals[-1], prompt_tokens=0, output_tokens=tokens, token_times=arrivals)
        try:
            result = answer(list(arrivals), tokens)
            if result is None:
                return False, "your function returns nothing yet: return ttft, decode_tps."
            ttft, tps = result
        except Exception as exc:              # the learner's code: show what it raised
            return False, f"it raised {type(exc).__name__}: {exc} for arrivals {arrivals}, {tokens} tokens."
        if not _close(ttft, want.ttft, rel=1e-6):
            return False, "TTFT is when the first chunk arrived (seconds after sending): arrivals[0]."
        if math.isnan(want.decode_tps):
            if tps is None or (isinstance(tps, float) and math.isnan(tps)):
                continue
            return False, "with a single token there is no decode phase to time: return float('nan')."
        if _close(tps, want.decode_tps, rel=1e-6):
            continue
        if _close(tps, (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), rel=1e-6):
            return False, (f"{len(arrivals)} chunks carried {tokens} tokens: count tokens from the engine's usage, "
                           "not chunks (a server may send several tokens in one chunk).")
        if _close(tps, tokens / arrivals[-1], rel=1e-6):
            return False, "the first token belongs to prefill: decode rate = (tokens − 1) ÷ (last arrival − first arrival)."
        return False, "decode tokens/s = (output tokens − 1) ÷ (time of the last chunk − time of the first)."
    return True, ""


EMPLOYEE_ID_CASES = {"EMP-123456": True, "Ask ABC-654321 about it.": True, "(EMP-000001)": True,
                     "EMP-12345": False, "XEMP-123456": False, "EMP-1234567": False, "emp-123456": False,
                     "The meeting on 2024-05-01 is in room 12.": False, "": False}


def _employee_id(answer):
    """``answer``: a function text -> bool finding IDs of three capital letters, a dash and six digits."""
    if not callable(answer):
        return False, "pass the function itself (has_employee_id), not its result."
    for text, expected in EMPLOYEE_ID_CASES.items():
        try:
            got = answer(text)
        except Exception as exc:              # the learner's code: show what it raised
            return False, f"it raised {type(exc).__name__}: {exc} on {text!r}."
        if got is None:
            return False, "it returns None: return True or False (e.g. re.search(...) is not None)."
        if bool(got) != expected:
            why = ("word boundaries (\\b) on both sides keep longer runs out" if expected is False
                   else "three capital letters, a dash, six digits")
            return False, f"{text!r} should give {expected}, got {bool(got)}: {why}."
    return True, ""


# vLLM's flags for exercise 04-vllm-serve (names from the installed vLLM's argument parser; see tests)
VLLM_SERVE_FLAGS = {"--max-model-len": "max_model_len", "--max-num-seqs": "max_num_seqs",
                    "--gpu-memory-utilization": "gpu_memory_utilization", "--host": "host", "--port": "port",
                    "--api-key": "api_key", "--quantization": "quantization", "-q": "quantization"}
VLLM_SERVE_TASK = {"model": "Qwen/Qwen2.5-7B-Instruct-AWQ", "max_model_len": "16384", "max_num_seqs": "8",
                   "gpu_memory_utilization": "0.85", "port": "8000", "api_key": "lab-secret"}


def _vllm_serve_args(answer) -> tuple[dict, str]:
    """The model and flags of a ``vllm serve`` command line, or a hint naming what an older guide taught."""
    words, hint = _shell_words(answer)
    if hint:
        return {}, hint
    if "vllm.entrypoints.openai.api_server" in words:
        return {}, "python -m vllm.entrypoints.openai.api_server is deprecated: the command is vllm serve MODEL."
    if words[:2] != ["vllm", "serve"]:
        return {}, "start with the command: vllm serve MODEL."
    args, rest = {}, words[2:]
    while rest:
        word = rest.pop(0)
        name, _, inline = word.partition("=")
        name = name.replace("_", "-") if name.startswith("--") else name     # vLLM accepts --max_model_len too
        if name == "--model":
            return {}, "with vllm serve the model is the first argument (vllm serve MODEL); --model is on its way out."
        if name == "--disable-log-requests":
            return {}, ("--disable-log-requests is gone from current vLLM (its parser refuses it and the server never "
                        "starts); request logging is off by default.")
        if not name.startswith("-"):
            if "model" in args:
                return {}, f"{word!r}: only one positional argument, the model."
            args["model"] = word
        elif name in VLLM_SERVE_FLAGS and (inline or rest):
            args[VLLM_SERVE_FLAGS[name]] = inline or rest.pop(0)
        else:
            return {}, f"{word!r} is not one of the flags this task needs (vllm serve --help=all lists them all)."
    return args, ""


def _vllm_serve(answer):
    """``answer``: the shell command that serves the task's model with vLLM."""
    args, hint = _vllm_serve_args(answer)
    if hint:
        return False, hint
    if args.get("model") != VLLM_SERVE_TASK["model"]:
        return False, f"the model goes right after serve: vllm serve {VLLM_SERVE_TASK['model']}."
    if "quantization" in args:
        return False, ("leave out --quantization: vLLM reads AWQ from the checkpoint's config and picks the fast "
                       "Marlin kernel; forcing awq selects a slower one.")
    if args.get("max_model_len") != VLLM_SERVE_TASK["max_model_len"]:
        return False, "cap prompt + output at 16384 tokens: --max-model-len 16384 (the default is the model's own 32768)."
    if args.get("max_num_seqs") != VLLM_SERVE_TASK["max_num_seqs"]:
        return False, "at most 8 sequences per scheduler step: --max-num-seqs 8."
    share = args.get("gpu_memory_utilization", "")
    if share != VLLM_SERVE_TASK["gpu_memory_utilization"]:
        if _close(share, 85):
            return False, "--gpu-memory-utilization is a fraction of the GPU's memory: 0.85, not 85."
        return False, "let vLLM pre-allocate 85% of the GPU: --gpu-memory-utilization 0.85."
    if args.get("host") not in ("127.0.0.1", "localhost", "::1"):
        return False, "vLLM listens on every interface unless told otherwise: --host 127.0.0.1 (unlike llama-server)."
    if args.get("port") != VLLM_SERVE_TASK["port"]:
        return False, "the port: --port 8000."
    if args.get("api_key") != VLLM_SERVE_TASK["api_key"]:
        return False, "vLLM has no authentication unless you ask: --api-key lab-secret."
    return True, ""


# ------------------------------------------------------------------ commands judged by the programs' own parsers
# `vllm serve`'s parser as the installed vLLM builds it (its module moved between releases), run in .venv-vllm on
# each argument list given as JSON in argv[1]: every option string it defines, and per list whether it parsed,
# the parser's error line, and the parsed values of the flags given.
_VLLM_SERVE_PARSER = r"""
import contextlib, importlib, io, json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
for where in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
    try:
        make = importlib.import_module(where).make_arg_parser
        break
    except ImportError:
        pass
parser = make(FlexibleArgumentParser())
verdicts = []
for args in json.loads(sys.argv[1]):
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed = parser.parse_args(args)
    except SystemExit:
        errors = [line[line.index("error:"):] for line in said.getvalue().splitlines() if "error:" in line]
        verdicts.append({"ok": False, "error": errors[-1] if errors else said.getvalue()[-300:], "values": {}})
        continue
    given = {w.split("=")[0].replace("_", "-") for w in args if w.startswith("--")}
    dests = {a.dest for a in parser._actions if given & set(a.option_strings)}
    verdicts.append({"ok": True, "error": "", "values": {k: v for k, v in vars(parsed).items() if k in dests}})
print(json.dumps({"flags": [s for a in parser._actions for s in a.option_strings], "verdicts": verdicts}, default=str))
"""


def vllm_serve_parse(arg_lists: list[list[str]], timeout: float = 300) -> tuple[set[str], list[dict]]:
    """The installed vLLM's own ``vllm serve`` argument parser on each list of the words after ``vllm serve``:
    (every option string it defines, one verdict per list: ``ok``, the parser's ``error`` line, the parsed
    ``values`` of the flags given). One run for all lists: importing vLLM takes seconds."""
    import json
    import subprocess

    from .servers import vllm_python
    run = subprocess.run([vllm_python(), "-c", _VLLM_SERVE_PARSER, json.dumps(arg_lists)], capture_output=True,
                         text=True, timeout=timeout, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"vLLM's argument parser did not run (exit {run.returncode}):\n{run.stderr[-2000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return set(out["flags"]), out["verdicts"]


def llama_server_parse(args: list[str]) -> tuple[bool, str]:
    """The built llama-server's own argument parser on ``args``: (accepted, its error line)
    (:func:`labkit.llama_tools.parse_args`)."""
    from .llama_tools import parse_args
    return parse_args("llama-server", args)


def command_verdicts(commands: list[str]) -> list[tuple[bool, str]]:
    """Each ``llama-server ...`` or ``vllm serve ...`` shell command judged by that program's own parser:
    (accepted, the parser's error line). Used on chapter 04's vision commands (labkit.vision.VISION_COMMANDS)."""
    words = []
    for command in commands:
        split, hint = _shell_words(command)
        if hint or not split:
            raise ValueError(f"{command!r}: {hint or 'empty command'}")
        if not (split[0].endswith("llama-server") or split[:2] == ["vllm", "serve"]):
            raise ValueError(f"{command!r}: only llama-server and vllm serve commands can be judged here")
        words.append(split)
    vllm_lists = [w[2:] for w in words if w[0] == "vllm"]
    vllm_verdicts = iter(vllm_serve_parse(vllm_lists)[1] if vllm_lists else [])
    out = []
    for w in words:
        if w[0] == "vllm":
            verdict = next(vllm_verdicts)
            out.append((verdict["ok"], verdict["error"]))
        else:
            out.append(llama_server_parse(w[1:]))
    return out


# exercise 05-rrf: (rankings, the constant k); graded against labkit.japanese.rrf_fuse
RRF_CASES = [([["a", "b", "c"], ["c", "a", "d"]], 60), ([["x", "y"], ["y", "z"], ["z", "y"]], 60),
             ([["x", "a", "y"], ["b", "y"]], 1), ([["solo"]], 60), ([["m", "n"], []], 60)]


def _rrf(answer):
    """``answer``: a function (rankings, k=60) -> list of ids, best first (reciprocal rank fusion)."""
    from .japanese import rrf_fuse
    if not callable(answer):
        return False, "pass the function itself (rrf), not its result."
    for rankings, k in RRF_CASES:
        want = [item for item, _ in rrf_fuse(rankings, k)]
        try:
            got = answer([list(r) for r in rankings], k)
        except Exception as exc:              # the learner's code: show what it raised
            return False, f"it raised {type(exc).__name__}: {exc} for {rankings}."
        if got is None:
            return False, "it returns None: return the fused ids, best first."
        got = [g[0] if isinstance(g, tuple) else g for g in got]
        if got == want:
            continue
        from_zero = [item for item, _ in rrf_fuse(rankings, k - 1)] if k >= 1 else None
        if got == list(reversed(want)):
            return False, "best first: sort by fused score, highest first."
        if got == from_zero and from_zero != want:
            return False, "ranks start at 1: the top item scores 1 / (k + 1), not 1 / k."
        return False, (f"for {rankings} with k={k} expected {want}, got {got}: score(d) = Σ 1 / (k + rank of d), "
                       "summed over every ranking that contains d.")
    return True, ""


# exercise 07-quant-ngl: Qwen2.5-14B on a 12 GB card at 8192 tokens (f16 KV cache)
QUANT_NGL_TASK = {"model": "Qwen2.5-14B", "vram_bytes": 12e9, "n_ctx": 8192,
                  "choices": ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")}    # best quality first


def _quant_ngl(answer):
    """``answer``: (quant, ngl) — the most precise quant that runs entirely on the GPU, and its -ngl."""
    from .memory import gpu_layers
    task = QUANT_NGL_TASK
    try:
        quant, ngl = answer
        quant, ngl = str(quant).upper(), int(ngl)
    except (TypeError, ValueError):
        return False, "answer with a pair: (\"Q4_K_M\", 49) — the quant's name and the -ngl number."
    if quant not in task["choices"]:
        return False, f"choose one of {', '.join(task['choices'])}."
    plans = {q: gpu_layers(task["model"], task["vram_bytes"], q, n_ctx=task["n_ctx"]) for q in task["choices"]}
    best = next(q for q in task["choices"] if plans[q].fully_offloaded)
    plan = plans[quant]
    if not plan.fully_offloaded:
        return False, (f"{quant}: only {plan.layers_on_gpu} of {plan.n_layers} layers fit (weights + their KV cache + "
                       f"compute buffer + 1 GiB reserve); the rest run on the CPU and set the pace of every token.")
    if quant != best:
        return False, f"{quant} fits, but a more precise quant fits too: take the best one that fits entirely."
    if ngl < plan.ngl:
        return False, (f"-ngl counts the output layer as one more: {plan.n_layers} repeating layers + 1 = {plan.ngl} "
                       "(any larger number, e.g. 99, means all).")
    return True, ""


# exercise 10-answer-labels: (prompt ids, full ids, end-of-turn id), shaped like a ChatML render
LABEL_CASES = [([1, 5, 6, 2, 1, 7], [1, 5, 6, 2, 1, 7, 40, 41, 2, 9], 2), ([3, 4], [3, 4, 10, 11, 12, 99], 99),
               ([8], [8, 20, 21], 2), ([1, 2, 3], [1, 2, 3, 30, 2, 9, 31, 2, 9], 2)]


def _answer_labels(answer):
    """``answer``: a function (prompt_ids, full_ids, end_id) -> (input_ids, labels)."""
    from .finetune import answer_labels
    if not callable(answer):
        return False, "pass the function itself (make_labels), not its result."
    for prompt_ids, full_ids, end_id in LABEL_CASES:
        want_ids, want_labels = answer_labels(prompt_ids, full_ids, end_id)
        try:
            result = answer(list(prompt_ids), list(full_ids), end_id)
            ids, labels = (list(x) for x in result)
        except Exception as exc:              # the learner's code: show what it raised
            return False, f"it raised {type(exc).__name__}: {exc} for prompt {prompt_ids}, full {full_ids}."
        case = f"(prompt {prompt_ids}, full {full_ids}, end {end_id})"
        if len(ids) != len(labels):
            return False, f"input ids and labels must have the same length {case}."
        if labels[:len(prompt_ids)] != want_labels[:len(prompt_ids)]:
            return False, f"mask the prompt with -100 {case}: the loss should teach answers, not questions."
        if (ids, labels) == (want_ids, want_labels):
            continue
        answer_part = labels[len(prompt_ids):]
        if end_id not in answer_part and [x for x in answer_part if x != -100] == [
                x for x in want_labels[len(prompt_ids):] if x != end_id]:
            return False, f"keep the end-of-turn token in the labels {case}: it is how the model learns to stop."
        if ids[:len(want_ids)] == want_ids and len(ids) > len(want_ids):
            return False, f"cut after the first end-of-turn token {case}: what follows it is template, not answer."
        return False, f"expected ids {want_ids} and labels {want_labels} {case}, got {ids} and {labels}."
    return True, ""


EXERCISES: dict[str, Exercise] = {e.id: e for e in [
    Exercise("01-q8_0", "01", "Write my_q8_0(x) returning ggml's Q8_0 bytes for a 1-D float32 array.", _q8_0),
    Exercise("01-bpw-q4k", "01", "Bits per weight of a pure Q4_K tensor, from its block layout.", _bpw_q4_k),
    Exercise("01-ngl", "01", "The -ngl for Qwen2.5-32B Q4_K_M at 32768 tokens on a 24 GB GPU.", _ngl),
    Exercise("02-tokens-per-s", "02", "Tokens/s of a reply with eval_count 128 and eval_duration 1600000000.", _tokens_per_s),
    Exercise("02-modelfile", "02", "A Modelfile: FROM smollm2:135m, a SYSTEM persona, PARAMETER temperature 0.2.", _modelfile),
    Exercise("03-kv-q8", "03", "Bytes of SmolLM2's q8_0 KV cache at n_ctx=4096 (30 layers, 3 KV heads, head_dim 64).", _kv_q8),
    Exercise("05-recall", "05", "recall@2 for rankings [[a,b,c],[c,a,b],[b,c,d],[d,a,c]] with gold [a,a,a,None].", _recall),
    Exercise("00-kv-cache", "00", "Bytes of f16 KV cache for Llama-3.1-8B at 8192 tokens, one sequence.", _kv_cache),
    Exercise("00-weights", "00", "GB (1e9 bytes) of Qwen2.5-7B's weights (7.62 B parameters) at Q4_K_M.", _weights),
    Exercise("04-paged-blocks", "04", "16-token blocks needed by four sequences of 5, 16, 17 and 100 tokens.", _paged_blocks),
    Exercise("06-decode-bound", "06", "Decode bound (tok/s) of an 8B Q4_K_M model (4.9e9 bytes) on a 1008 GB/s GPU.", _decode_bound),
    Exercise("08-nginx-site", "08", "Fix a broken nginx site: rate limit 5r/s (zone in http {}), streaming "
             "without buffering, proxy to 127.0.0.1:8080, listening on loopback; graded by nginx -t.", _nginx_site),
    Exercise("09-employee-id", "09", "has_employee_id(text): find IDs like EMP-123456 (three capitals, a dash, six "
             "digits) and nothing longer or shorter, for a router privacy rule.", _employee_id),
    Exercise("03-llama-server", "03", "The llama-server command for Qwen2.5-7B Q4_K_M: every layer on the GPU, 16384 tokens "
             "of context for 4 parallel slots, loopback only on port 8081, API key lab-secret.", _llama_server),
    Exercise("06-stream-timing", "06", "stream_timing(arrivals, output_tokens) -> (TTFT, decode tokens/s) of one streamed "
             "reply, from its chunks' arrival times and the engine's token count.", _stream_timing),
    Exercise("07-fits", "07", "Bytes the chapter's model (check(..., model=model); the bundled SmolLM2 by default) needs "
                              "for weights + f16 KV cache at n_ctx=32768.", _fits),
    Exercise("04-vllm-serve", "04", "The vllm serve command for Qwen/Qwen2.5-7B-Instruct-AWQ: 16384-token context, at most "
             "8 sequences at once, 85% of GPU memory, loopback only on port 8000, API key lab-secret.", _vllm_serve),
    Exercise("05-rrf", "05", "rrf(rankings, k=60): fuse several rankings of ids by reciprocal rank fusion, best first.",
             _rrf),
    Exercise("07-quant-ngl", "07", "Qwen2.5-14B on a 12 GB GPU at 8192 tokens: the most precise of Q8_0, Q6_K, Q5_K_M, "
             "Q4_K_M, Q3_K_M that puts every layer on the GPU, and its -ngl.", _quant_ngl),
    Exercise("10-answer-labels", "10", "make_labels(prompt_ids, full_ids, end_id) -> (input_ids, labels): learn the "
             "answer and its end-of-turn token, not the prompt nor what follows.", _answer_labels),
]}


def register(exercise: Exercise) -> None:
    """Add a chapter's exercise (chapters with their own helpers register theirs)."""
    EXERCISES[exercise.id] = exercise


def check(exercise_id: str, answer: Any, *, model=None) -> bool:
    """Grade an answer, print the verdict (with a hint on failure) and return it. ``model``: the model the
    chapter runs on, for the exercises about it (``07-fits``); the others take no model."""
    if exercise_id not in EXERCISES:
        raise KeyError(f"No exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    if answer is None or answer is Ellipsis:
        print(f"⏳ {exercise_id}: not answered yet — replace the ... with your answer.")
        return False
    grade = EXERCISES[exercise_id].grade
    if model is not None and "model" not in inspect.signature(grade).parameters:
        raise TypeError(f"exercise {exercise_id!r} is not about a chapter's model: call check({exercise_id!r}, answer)")
    ok, hint = grade(answer, model=model) if model is not None else grade(answer)
    print(f"✅ {exercise_id}: correct." if ok else f"❌ {exercise_id}: {hint}")
    return ok
