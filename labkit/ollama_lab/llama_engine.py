"""llama-cpp-python's ``Llama`` as the server's :class:`~labkit.ollama_lab.engine.TextEngine`.

``Llama`` already has every method the server calls but three, which it can only reach through
``Llama``'s private fields; :class:`LlamaEngine` adds them, so the rest of the server never touches
llama.cpp's internals. Imported only when a model is loaded (it imports llama_cpp).
"""
from __future__ import annotations

import llama_cpp
import numpy as np
from llama_cpp import Llama


class LlamaEngine(Llama):
    """``Llama`` plus :meth:`token_text`, :meth:`is_eog` and :meth:`last_logprobs`."""

    def token_text(self, token: int) -> str:
        return self._model.token_get_text(token)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def last_logprobs(self) -> np.ndarray:
        """The model's own log-probabilities (log-softmax of the raw logits, before temperature and
        other samplers) at the last position, as Ollama reports them."""
        n_vocab = self.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1), shape=(n_vocab,))
        return self.logits_to_logprobs(logits.astype(np.float32))
