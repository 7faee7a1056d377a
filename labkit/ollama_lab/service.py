"""The service behind both APIs: what the server knows about a model (details, model_info,
capabilities, its Modelfile), how a request's options are merged and checked, how a prompt is built,
and the token loop that generates text. No HTTP here.
"""
from __future__ import annotations

import codecs
import json
import math
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import modelfile as mf
from .errors import APIError
from .names import normalize_name, now_rfc3339
from .scheduler import Loaded, Scheduler
from .store import Manifest, Store
from .template import references, render_go_template
from .tools import tool_tag
from .types import ListedModel, ModelDetails

DEFAULT_TEMPLATE = "{{ .Prompt }}"   # what Ollama gives a model imported without a template


def _human_params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            value = n / div
            return f"{value:.2f}".rstrip("0").rstrip(".") + unit
    return str(int(n))


def ftype_names() -> dict[int, str]:
    """``general.file_type`` → llama.cpp's name for it (F32, F16, BF16, Q4_K_M, IQ2_XXS, ...).

    Read from llama-cpp-python's ``LLAMA_FTYPE_*`` constants rather than from
    :data:`labkit.gguf.FTYPES`: that table lists only the quantize presets, and a file's type may
    also be F32, BF16 or an IQ type, which ``/api/show`` names too. For the presets both agree.
    """
    import llama_cpp
    out = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_") and attr != "LLAMA_FTYPE_GUESSED":
            out[getattr(llama_cpp, attr)] = attr.replace("LLAMA_FTYPE_MOSTLY_", "").replace("LLAMA_FTYPE_ALL_", "")
    return out


def token_logprobs(inst, token: int, top: int) -> dict:
    """Ollama's logprob entry for ``token``, just sampled by ``inst``: its text, log-probability and
    bytes, and the ``top`` most likely tokens at that position. Log-probabilities are the engine's
    (:meth:`~labkit.ollama_lab.engine.TextEngine.last_logprobs`: the model's own, before temperature
    and other samplers), as Ollama reports them."""
    import numpy as np
    logprobs = np.asarray(inst.last_logprobs())

    def entry(t: int) -> dict:
        raw = inst.detokenize([int(t)])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprobs[t]), "bytes": list(raw)}

    out = entry(token)
    if top > 0:
        best = np.argpartition(-logprobs, top)[:top]
        out["top_logprobs"] = [entry(t) for t in best[np.argsort(-logprobs[best], kind="stable")]]
    return out


class Service:
    """What the server does with models, over a :class:`Store` and a :class:`Scheduler`; the HTTP
    handlers (:mod:`.native`, :mod:`.openai`) and the planner (:mod:`.create`) call it."""

    def __init__(self, store: Store, sched: Scheduler):
        self.store, self.sched = store, sched
        self._info_cache: dict[str, tuple] = {}

    # ---------------------------------------------------------------- registration
    def register(self, name: str, path: Path, *, builtin: bool = True, overwrite: bool = False) -> None:
        name = normalize_name(name)
        if self.store.get(name) and not overwrite:
            return
        kind = "gguf" if Path(path).is_file() else "sentence-transformers"
        self.store.put(Manifest(name=name, kind=kind, path=str(Path(path).resolve()), builtin=builtin))

    # ---------------------------------------------------------------- model facts
    def header(self, path: str):
        """The GGUF header of ``path`` (:func:`labkit.gguf.read_header`), cached while the file is unchanged."""
        from ..gguf import read_header
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._info_cache:
            self._info_cache[key] = (read_header(path),)
        return self._info_cache[key][0]

    def details(self, m: Manifest) -> ModelDetails:
        if m.kind == "gguf":
            h = self.header(m.path)
            arch = h.architecture or "unknown"
            ftype = h.metadata.get("general.file_type")
            level = ftype_names().get(ftype, "unknown") if ftype is not None else "unknown"
            return {"parent_model": m.parent, "format": "gguf", "family": arch, "families": [arch],
                    "parameter_size": _human_params(h.n_parameters), "quantization_level": level}
        cfg = json.loads((Path(m.path) / "config.json").read_text())
        arch = cfg.get("model_type", "bert")
        n = self._st_params(m)
        return {"parent_model": m.parent, "format": "safetensors", "family": arch, "families": [arch],
                "parameter_size": _human_params(n), "quantization_level": str(cfg.get("torch_dtype", "F32")).upper()
                .replace("FLOAT32", "F32").replace("FLOAT16", "F16")}

    def _st_params(self, m: Manifest) -> int:
        total = 0
        for f in Path(m.path).glob("*.safetensors"):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    total += math.prod(v["shape"])
        return total

    def model_info(self, m: Manifest, verbose: bool) -> dict:
        if m.kind == "gguf":
            h = self.header(m.path)
            info = {}
            for k, v in h.metadata.items():
                if isinstance(v, list) and len(v) > 64 and not verbose:
                    v = []
                info[k] = v
            info["general.parameter_count"] = h.n_parameters
            return info
        cfg = json.loads((Path(m.path) / "config.json").read_text())
        arch = cfg.get("model_type", "bert")
        return {"general.architecture": arch, "general.parameter_count": self._st_params(m),
                f"{arch}.embedding_length": cfg.get("hidden_size"), f"{arch}.block_count": cfg.get("num_hidden_layers"),
                f"{arch}.attention.head_count": cfg.get("num_attention_heads"),
                f"{arch}.context_length": cfg.get("max_position_embeddings")}

    def capabilities(self, m: Manifest) -> list[str]:
        """Ollama's rule: a model completes text; it calls tools when its template uses ``.Tools``
        (for a GGUF's own Jinja template: when it mentions ``tools``)."""
        if m.kind != "gguf":
            return ["embedding"]
        caps = ["completion"]
        if self.supports_tools(m):
            caps.append("tools")
        return caps

    def supports_tools(self, m: Manifest) -> bool:
        if m.kind != "gguf":
            return False
        if m.template is not None:
            return references(m.template, "Tools")
        return "tools" in self.chat_template(m)

    def tool_tag(self, m: Manifest) -> str:
        """What marks a tool call in this model's output (:func:`labkit.ollama_lab.tools.tool_tag`)."""
        return tool_tag(self.chat_template(m), jinja=m.template is None)

    def chat_template(self, m: Manifest) -> str:
        if m.template is not None:
            return m.template
        if m.kind == "gguf":
            return str(self.header(m.path).metadata.get("tokenizer.chat_template", ""))
        return ""

    def modelfile_text(self, m: Manifest) -> str:
        header = (f'# Modelfile generated by labkit\'s Ollama-compatible server ("ollama show")\n'
                  f"# To build a new Modelfile based on this one, replace the FROM line with:\n# FROM {m.name}\n")
        return mf.render(from_=m.path, system=m.system, template=m.template, parameters=m.parameters,
                         messages=m.messages, license=m.license, adapters=m.adapters, header=header)

    def entry(self, m: Manifest) -> ListedModel:
        return {"name": m.name, "model": m.name, "modified_at": now_rfc3339(m.modified_ns, utc=False),
                "size": m.size, "digest": m.digest, "details": self.details(m)}

    # ---------------------------------------------------------------- options
    @staticmethod
    def options(body: dict, manifest: Manifest) -> dict:
        raw = body.get("options") or {}
        if not isinstance(raw, dict):
            raise APIError(400, "options must be a JSON object, e.g. {\"temperature\": 0}")
        merged = dict(manifest.parameters)
        for key, value in raw.items():
            if value is None:
                continue
            if key not in mf.PARAMETER_TYPES:
                print(f"warning: invalid option provided: {key} (ignored, as Ollama does)", flush=True)
                continue
            try:
                merged[key] = mf.coerce_parameter(key, value)
            except mf.ModelfileError as exc:
                raise APIError(400, f"invalid options: {exc}") from None
        return merged

    @staticmethod
    def grammar_for(fmt: Any):
        if fmt in (None, ""):
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
        if fmt == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if isinstance(fmt, dict):
            try:
                return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
            except Exception as exc:
                raise APIError(400, f"invalid JSON schema in format: {exc}") from None
        raise APIError(400, f"invalid format {fmt!r}: use \"json\" or a JSON schema object")

    # ---------------------------------------------------------------- prompts
    def _formatter(self, lm: Loaded, inst):
        if lm.formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            tmpl = inst.metadata.get("tokenizer.chat_template")
            if not tmpl:
                raise APIError(400, f"{lm.name} has no chat template; set TEMPLATE in a Modelfile or use raw")
            eos = inst.token_text(inst.token_eos()) if inst.token_eos() >= 0 else ""
            bos = inst.token_text(inst.token_bos()) if inst.token_bos() >= 0 else ""
            lm.formatter = Jinja2ChatFormatter(template=tmpl, eos_token=eos, bos_token=bos)
        return lm.formatter

    def build_prompt(self, lm: Loaded, inst, messages: list[dict], template: str | None,
                     tools: list[dict] | None = None) -> str:
        """The prompt for ``messages`` (dicts with role, content and maybe tool_calls, tool_name) and
        ``tools``: through a Modelfile TEMPLATE (Go), else the GGUF's own Jinja chat template."""
        if not template and not inst.metadata.get("tokenizer.chat_template"):
            # Ollama's default for a model with no template (docs/template.md): user input verbatim.
            template = DEFAULT_TEMPLATE
        if template and references(template, "Messages"):
            system = "\n".join(x["content"] for x in messages if x["role"] == "system")
            values = {"System": system, "Messages": [x for x in messages if x["role"] != "system"],
                      "Tools": tools or [], "Prompt": "", "Response": ""}
            return render_go_template(template, values)
        if template:
            return self._classic_prompt(messages, template)
        jinja = str(inst.metadata.get("tokenizer.chat_template"))
        if any(x.get("tool_calls") for x in messages) and "tool_calls" not in jinja:
            raise APIError(400, f"{lm.name}'s chat template cannot show an assistant message's tool_calls (it "
                                "would drop them from the prompt); send the calls as content, or use a model "
                                "whose template supports tools (\"tools\" in /api/show capabilities)")
        oai = [self._jinja_message(x) for x in messages]
        return self._formatter(lm, inst)(messages=oai, tools=tools or None).prompt

    @staticmethod
    def _jinja_message(x: dict) -> dict:
        """A message as Hugging Face chat templates expect it (tool-call arguments as objects)."""
        out = {"role": x["role"], "content": x["content"]}
        if x.get("tool_calls"):
            out["tool_calls"] = [{"type": "function", **c} for c in x["tool_calls"]]
        if x.get("tool_name"):
            out["name"] = x["tool_name"]
        return out

    @staticmethod
    def _classic_prompt(messages: list[dict], template: str) -> str:
        """A ``.System``/``.Prompt``/``.Response`` template, rendered turn by turn as Ollama does."""
        if any(x["role"] == "tool" or x.get("tool_calls") for x in messages):
            raise APIError(400, "this model's TEMPLATE only has .System, .Prompt and .Response, so it cannot show "
                                "tool calls or role \"tool\" messages (they would be dropped from the prompt); "
                                "use a template that ranges over .Messages, or send them as user/assistant text")
        system = "\n".join(x["content"] for x in messages if x["role"] == "system")
        turns = [x for x in messages if x["role"] != "system"]
        out, first = [], True
        for i, msg in enumerate(turns):
            if msg["role"] != "user":
                continue
            reply = turns[i + 1]["content"] if i + 1 < len(turns) and turns[i + 1]["role"] == "assistant" else None
            values = {"System": system if first else "", "Prompt": msg["content"], "Response": reply or ""}
            out.append(render_go_template(template, values, stop_at_response=reply is None))
            first = False
        if not out:
            out.append(render_go_template(template, {"System": system, "Prompt": "", "Response": ""}))
        return "".join(out)

    # ---------------------------------------------------------------- generation core
    def run(self, inst, tokens: list[int], opts: dict, grammar, stats: dict,
            top_logprobs: int | None = None) -> Iterator[str]:
        """Yield text pieces of ``inst``'s answer (a :class:`~labkit.ollama_lab.engine.TextEngine`);
        fill ``stats`` with counts, durations (ns) and done_reason.

        With ``top_logprobs`` (0-20) set, each generated token's log-probability (and that many
        alternatives) is appended to ``stats["logprobs"]`` before the piece holding its text is
        yielded; the caller takes them from there. A token whose text never reaches the reply (the
        end of a stop string) has none."""
        n_ctx = inst.n_ctx()
        limit = int(opts.get("num_predict", -1))
        if len(tokens) >= n_ctx - 1:         # keep the most recent tokens, as Ollama truncates
            keep = max(1, n_ctx // 2)
            print(f"warning: prompt of {len(tokens)} tokens exceeds num_ctx={n_ctx}; truncating to {keep}", flush=True)
            tokens = tokens[-keep:]
        seed = opts.get("seed", -1)
        if seed is not None and int(seed) >= 0:
            # Reproducible outputs: evaluate the whole prompt afresh. Reusing a cached prefix
            # computes the last logits by another kernel path, and sampling at temperature > 0
            # can then pick another token.
            inst.reset()
            inst.set_seed(int(seed))
        else:
            inst.set_seed(random.getrandbits(31))
        stops = [s for s in (opts.get("stop") or []) if s]
        stats.update(prompt_eval_count=len(tokens), eval_count=0, done_reason="stop")
        gen = inst.generate(
            tokens, top_k=int(opts.get("top_k", 40)), top_p=float(opts.get("top_p", 0.9)),
            min_p=float(opts.get("min_p", 0.0)), typical_p=float(opts.get("typical_p", 1.0)),
            temp=float(opts.get("temperature", 0.8)), repeat_penalty=float(opts.get("repeat_penalty", 1.0)),
            frequency_penalty=float(opts.get("frequency_penalty", 0.0)),
            presence_penalty=float(opts.get("presence_penalty", 0.0)),
            mirostat_mode=int(opts.get("mirostat", 0)), mirostat_tau=float(opts.get("mirostat_tau", 5.0)),
            mirostat_eta=float(opts.get("mirostat_eta", 0.1)), grammar=grammar)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, history = "", list(tokens)
        t_start = time.perf_counter_ns()
        t_first = None
        try:
            for tok in gen:
                if t_first is None:
                    t_first = time.perf_counter_ns()
                if inst.is_eog(tok):
                    stats["done_reason"] = "stop"
                    break
                stats["eval_count"] += 1
                if top_logprobs is not None:
                    stats.setdefault("logprobs", []).append(token_logprobs(inst, tok, top_logprobs))
                piece = decoder.decode(inst.detokenize([tok], prev_tokens=history[-8:]))
                history.append(tok)
                pending += piece
                hit = min(((pending.find(s), s) for s in stops if s in pending), default=None)
                if hit:
                    out = pending[:hit[0]]
                    if top_logprobs is not None and not out:
                        stats["logprobs"] = []       # only the stop string: its tokens are not in the reply
                    if out:
                        yield out
                    pending = ""
                    stats["done_reason"] = "stop"
                    break
                keep = max((k for s in stops for k in range(len(s) - 1, 0, -1) if pending.endswith(s[:k])), default=0)
                out, pending = (pending[:-keep], pending[-keep:]) if keep else (pending, "")
                if out:
                    yield out
                if (limit > 0 and stats["eval_count"] >= limit) or len(history) >= n_ctx:
                    stats["done_reason"] = "length"
                    break
            else:
                stats["done_reason"] = "stop"
            rest = pending + decoder.decode(b"", final=True)
            if rest:                          # a partial stop string that never completed is text
                yield rest
        finally:
            gen.close()
            t_end = time.perf_counter_ns()
            t_first = t_first or t_end
            stats["prompt_eval_duration"] = t_first - t_start
            stats["eval_duration"] = t_end - t_first
            stats["context"] = history
