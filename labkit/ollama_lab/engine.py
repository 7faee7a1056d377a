"""The engine seam: what the server asks of a loaded model, and the factory that loads one.

The :class:`~labkit.ollama_lab.scheduler.Scheduler` loads every model through an
:class:`EngineFactory`. The default, :func:`llama_cpp_engine`, builds llama-cpp-python's ``Llama``
(as :class:`~labkit.ollama_lab.llama_engine.LlamaEngine`, which adds the three methods below that
``Llama`` spells through its private fields) or, for an embedding model's folder, a
sentence-transformers model. Tests pass a fake factory whose engine yields scripted tokens
(``tests/fake_engine.py``), the way Ollama's route tests put a mock runner behind its handlers, so
the wire format, options, errors and cancellation are checked in process, in milliseconds.

The protocols list everything the server calls on an engine; nothing else may be used.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from ..env import default_threads
from .store import Manifest


@runtime_checkable
class TextEngine(Protocol):
    """A loaded GGUF model answering ``/api/generate`` and ``/api/chat`` (one per parallel request).

    ``llama_cpp.Llama``'s own methods and signatures, plus :meth:`token_text`, :meth:`is_eog` and
    :meth:`last_logprobs`."""

    metadata: dict[str, str]          # GGUF metadata as strings; the server reads tokenizer.chat_template

    def n_ctx(self) -> int: ...

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes: ...

    def token_bos(self) -> int: ...           # -1: none

    def token_eos(self) -> int: ...           # -1: none

    def token_text(self, token: int) -> str:
        """The vocabulary's text of ``token`` (special tokens as written, e.g. ``<|im_end|>``)."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (end of sequence, end of turn)."""
        ...

    def reset(self) -> None:
        """Forget the cached prompt, so the next :meth:`generate` evaluates it afresh."""
        ...

    def set_seed(self, seed: int) -> None: ...

    def generate(self, tokens: Sequence[int], *, top_k: int, top_p: float, min_p: float, typical_p: float,
                 temp: float, repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                 mirostat_mode: int, mirostat_tau: float, mirostat_eta: float, grammar: Any) -> Iterator[int]:
        """Token ids sampled after ``tokens``, without end; a generator, closed when the answer ends.
        ``grammar`` is a ``llama_cpp.LlamaGrammar`` (``format``) or None."""
        ...

    def last_logprobs(self) -> Any:
        """Log-probabilities (a numpy vector over the vocabulary) at the last position evaluated:
        those of the token :meth:`generate` just yielded. Only called when a request asks for logprobs."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class GGUFEmbedder(Protocol):
    """A GGUF model loaded for embeddings (``/api/embed`` on a GGUF model): ``Llama(embedding=True)``."""

    def n_ctx(self) -> int: ...

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes: ...

    def embed(self, input: str, normalize: bool = True) -> list[float]: ...


@runtime_checkable
class SentenceEmbedder(Protocol):
    """An embedding model's folder loaded with sentence-transformers (``all-minilm``)."""

    max_seq_length: int
    tokenizer: Any                    # tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode(self, sentences: list[str], normalize_embeddings: bool = False, convert_to_numpy: bool = True) -> Any: ...


class EngineFactory(Protocol):
    """Loads the model of ``manifest`` with the runner options (``num_ctx``, ``num_thread``, ...) of
    :meth:`~labkit.ollama_lab.scheduler.Scheduler.runner_options`: a :class:`TextEngine` for a GGUF
    model, a :class:`GGUFEmbedder` with ``embedding=True``, a :class:`SentenceEmbedder` for a
    sentence-transformers folder. Any exception becomes a 500 naming the model."""

    def __call__(self, manifest: Manifest, options: dict, *, embedding: bool = False) -> Any: ...


def llama_cpp_engine(manifest: Manifest, options: dict, *, embedding: bool = False) -> Any:
    """The real engines: llama-cpp-python for GGUF files, sentence-transformers for embedding folders."""
    m, o = manifest, options
    if m.kind == "sentence-transformers":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer
        # torch's OpenMP pool (its own libgomp) next to llama.cpp's in this process: its idle threads spin on the
        # cores llama.cpp's threads need, and every later generation ran ~2.5x slower (measured, 64 tokens:
        # 0.77 s before the first embedding, 1.95 s after). One torch thread leaves llama.cpp the cores; a small
        # embedding model hardly notices. (Ollama runs each model in its own runner process.)
        torch.set_num_threads(1)
        return SentenceTransformer(m.path, device="cpu")
    if embedding:
        import llama_cpp
        from llama_cpp import Llama
        return Llama(model_path=m.path, embedding=True, n_ctx=int(o.get("num_ctx", 0)) or 2048,
                     pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False,
                     n_threads=o.get("num_thread") or None,
                     lora_path=m.adapters[0] if m.adapters else None)
    from .llama_engine import LlamaEngine
    kwargs = {"model_path": m.path, "n_ctx": int(o["num_ctx"]), "n_batch": int(o.get("num_batch", 512)),
              "verbose": False, "seed": 0}
    # One thread count for decode and prompt batches: one per physical core unless num_thread says
    # otherwise (llama-cpp-python would use every logical core for batches, which collapses when
    # other processes share the CPU).
    threads = int(o.get("num_thread") or default_threads())
    kwargs["n_threads"] = kwargs["n_threads_batch"] = threads
    if o.get("num_gpu") not in (None, -1):
        kwargs["n_gpu_layers"] = int(o["num_gpu"])
    else:
        kwargs["n_gpu_layers"] = -1                  # like Ollama: offload what fits (no-op on CPU builds)
    if "use_mmap" in o:
        kwargs["use_mmap"] = bool(o["use_mmap"])
    if o.get("use_mlock"):
        kwargs["use_mlock"] = True
    if o.get("repeat_last_n"):
        kwargs["last_n_tokens_size"] = int(o["repeat_last_n"])
    if m.adapters:
        kwargs["lora_path"] = m.adapters[0]          # create allows one (llama-cpp-python applies one)
    return LlamaEngine(**kwargs)
