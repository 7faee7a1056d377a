"""Japanese documents in the RAG pipeline, measured (introduced in chapter 05).

The Kelvane Islands corpus also exists in Japanese (``data/rag_ja/``: twelve documents written
in Japanese from the same invented facts, twenty labelled questions). Japanese breaks three
assumptions the English pipeline makes silently:

* **Tokens.** Tokenizers trained mostly on English split Japanese into many byte-level pieces:
  :func:`tokens_per_char` and :func:`tokenizer_table` measure tokens per character and tokens
  for the *same content* on the parallel documents (:func:`parallel_texts`). An uncased WordPiece
  model such as all-MiniLM-L6-v2 also maps characters outside its vocabulary to ``[UNK]``
  (:func:`unknown_share`) and strips the voicing marks (ブ → フ) along with accents.
* **Sentences.** There are no spaces. ``RecursiveCharacterTextSplitter``'s default separators
  (paragraph, line, space, character) therefore fall through to single characters and cut
  inside sentences, often inside words; :func:`japanese_splitter` splits at 。！？ and keeps the
  mark with its sentence. :func:`mid_sentence_share` measures the difference.
* **Words.** BM25 needs words; whitespace gives none. :func:`ja_tokens` segments with MeCab
  (``fugashi`` + the ``unidic-lite`` dictionary) and drops particles and punctuation.

Retrieval compares BM25 (``rank_bm25.BM25Okapi``), dense search (the chapter's FAISS index)
and a hybrid by **reciprocal rank fusion** (:func:`rrf_fuse`; Cormack, Clarke & Büttcher 2009,
*Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning Methods*, SIGIR),
all behind one LangChain retriever (:class:`JapaneseRetriever`) and scored with
:func:`labkit.rag.recall_at_k` / :func:`labkit.rag.mrr` exactly like the English set.

Answers are scored with :func:`score` — substring matching after NFKC normalisation, since
Japanese has no word boundaries to match on (digits must not continue the number: "41" does not
match "141"). For real Japanese retrieval use a multilingual or Japanese embedder
(:data:`MULTILINGUAL_EMBEDDERS`); several need different prefixes on queries and passages,
which :class:`PrefixedEmbeddings` applies.

>>> rrf_fuse([["a", "b", "c"], ["b", "c", "a"]], k=60)[0][0]
'b'
>>> is_correct("首都はポート・アンブレルです。", "ポート・アンブレル"), is_correct("141議席", "41")
(True, False)
>>> is_refusal("わかりません。"), is_refusal("カドウ山")
(True, False)
"""
from __future__ import annotations

import functools
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever

from . import env, models, rag
from .errors import ModelNotFoundError

DATA_DIR = env.DATA_DIR / "rag_ja"
DOCS_DIR = DATA_DIR / "docs"
QUESTIONS_PATH = DATA_DIR / "questions.jsonl"

SENTENCE_ENDS = "。！？!?"
# Paragraph, line, sentence end, then the comma 、 as a last resort before single characters.
JA_SEPARATORS = ["\n\n", "\n", "。", "！", "？", "、", ""]


# --------------------------------------------------------------------------- corpus
def load_corpus(folder: str | Path = DOCS_DIR) -> rag.LoadReport:
    """The Japanese documents, loaded by :func:`labkit.rag.load_corpus` (same metadata)."""
    return rag.load_corpus(folder)


def load_questions(path: str | Path = QUESTIONS_PATH) -> list[dict]:
    """The Japanese question set, same JSONL shape as the English one."""
    return rag.load_questions(path)


def parallel_texts(ja_folder: str | Path = DOCS_DIR, en_folder: str | Path = rag.DOCS_DIR) -> list[tuple[str, str, str]]:
    """``(doc_id, Japanese text, English text)`` for every Japanese document and its English original."""
    ja = {d.metadata["doc_id"]: d.page_content for d in rag.load_corpus(ja_folder).documents}
    en = {d.metadata["doc_id"]: d.page_content for d in rag.load_corpus(en_folder).documents}
    missing = sorted(set(ja) - set(en))
    if missing:
        raise ValueError(f"Japanese documents without an English original in {en_folder}: {missing}. "
                         "Name each Japanese file after the English document it translates.")
    return [(doc_id, ja[doc_id], en[doc_id]) for doc_id in sorted(ja)]


# --------------------------------------------------------------------------- tokenizers
def hf_tokenizer(name_or_path: str | Path = "minilm"):
    """The Hugging Face tokenizer of a bundled or local HF model folder (e.g. the embedding model)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(models.get(name_or_path, verify=False)))


def token_counter(tokenizer_or_model) -> Callable[[str], int]:
    """A ``text -> number of tokens`` function (no special tokens) for any of:

    a bundled name or path (GGUF: its vocabulary only; HF folder: its tokenizer), a Hugging Face
    tokenizer, a ``llama_cpp.Llama``, or a counting function (returned as is).
    """
    obj = tokenizer_or_model
    if isinstance(obj, (str, Path)):
        path = models.get(obj)
        obj = rag.token_counter(path) if path.is_file() else hf_tokenizer(str(path))
    if hasattr(obj, "convert_tokens_to_ids"):                       # transformers tokenizer
        return lambda text: len(obj.tokenize(text))
    if hasattr(obj, "tokenize") and hasattr(obj, "n_vocab"):        # llama_cpp.Llama
        return lambda text: len(obj.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    if callable(obj):
        return obj
    raise TypeError(f"Cannot count tokens with a {type(obj).__name__}: pass a model name or path, "
                    "a transformers tokenizer, a llama_cpp.Llama or a function text -> int.")


def tokens_per_char(tokenizer_or_model, texts: Sequence[str]) -> float:
    """Total tokens / total characters over ``texts`` (see :func:`token_counter` for the first argument)."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("tokens_per_char needs at least one non-empty text")
    count = token_counter(tokenizer_or_model)
    return sum(count(t) for t in texts) / sum(len(t) for t in texts)


def unknown_share(tokenizer, texts: Sequence[str]) -> float:
    """Share of a transformers tokenizer's tokens that are its unknown token (``[UNK]``)."""
    pieces = [p for t in texts for p in tokenizer.tokenize(t)]
    if not pieces:
        raise ValueError("unknown_share needs at least one non-empty text")
    return sum(p == tokenizer.unk_token for p in pieces) / len(pieces)


def available_tokenizers(names: Sequence[str] = ("smollm2", "gemma3", "minilm")) -> tuple[dict, dict]:
    """``({name: tokenizer}, {name: reason skipped})`` — a model that is not installed is skipped, not fatal."""
    found, skipped = {}, {}
    for name in names:
        try:      # no checksum: only the vocabulary is read (rag.token_counter still checks the GGUF header)
            path = models.get(name, verify=False)
            found[name] = rag.token_counter(path) if path.is_file() else hf_tokenizer(path)
        except ModelNotFoundError as exc:
            skipped[name] = str(exc).splitlines()[0]
    return found, skipped


def tokenizer_table(pairs: Sequence[tuple[str, str, str]], tokenizers: dict) -> list[dict]:
    """One row per tokenizer on parallel documents: tokens per character in each language, and
    how many times more tokens the Japanese version of the same content needs."""
    ja_texts, en_texts = [p[1] for p in pairs], [p[2] for p in pairs]
    rows = []
    for name, tok in tokenizers.items():
        count = token_counter(tok)
        ja_tokens, en_tokens = sum(map(count, ja_texts)), sum(map(count, en_texts))
        row = {"tokenizer": name, "ja tokens/char": ja_tokens / sum(map(len, ja_texts)),
               "en tokens/char": en_tokens / sum(map(len, en_texts)),
               "ja tokens": ja_tokens, "en tokens": en_tokens, "same content: ja/en tokens": ja_tokens / en_tokens}
        if hasattr(tok, "unk_token"):
            row.update({"ja [UNK] share": unknown_share(tok, ja_texts), "en [UNK] share": unknown_share(tok, en_texts)})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- splitting
def japanese_splitter(chunk_size: int = 200, chunk_overlap: int | None = None):
    """``RecursiveCharacterTextSplitter`` that cuts at paragraphs, lines, then 。！？ (kept at the
    end of their sentence), then 、, and only then between characters."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    if chunk_overlap is None:
        chunk_overlap = chunk_size * 15 // 100
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be between 0 and chunk_size - 1 ({chunk_size - 1}), got {chunk_overlap}")
    return RecursiveCharacterTextSplitter(separators=JA_SEPARATORS, keep_separator="end", chunk_size=chunk_size,
                                          chunk_overlap=chunk_overlap, add_start_index=True)


def split_documents(documents: Sequence, *, chunk_size: int = 200, chunk_overlap: int | None = None) -> list:
    """Like :func:`labkit.rag.split_documents` (same metadata: ``start_index``, ``chunk``) but sentence-aware."""
    if not documents:
        raise rag.EmptyCorpusError("No documents to split: load_corpus() returned none.")
    chunks = japanese_splitter(chunk_size, chunk_overlap).split_documents(list(documents))
    for i, c in enumerate(chunks):
        c.metadata["chunk"] = i
    return chunks


def cuts_mid_sentence(chunk_text: str, document_text: str, start: int) -> bool:
    """True when a chunk ends inside a sentence: not on 。！？ and not at a line break or the end of the text."""
    text = chunk_text.rstrip()
    if not text or text[-1] in SENTENCE_ENDS:
        return False
    rest = document_text[start + len(text):]
    return bool(rest) and not rest.startswith(("\n", "\r"))


def mid_sentence_share(chunks: Sequence, documents: Sequence) -> float:
    """Share of ``chunks`` (with ``start_index`` and ``doc_id`` metadata) that end mid-sentence."""
    texts = {d.metadata["doc_id"]: d.page_content for d in documents}
    if not chunks:
        raise ValueError("no chunks to measure")
    cut = [cuts_mid_sentence(c.page_content, texts[c.metadata["doc_id"]], c.metadata["start_index"]) for c in chunks]
    return sum(cut) / len(cut)


# --------------------------------------------------------------------------- BM25
# MeCab parts of speech that carry no topic: particles, auxiliary verbs, punctuation/symbols, blanks.
STOP_POS = ("助詞", "助動詞", "補助記号", "空白")


@functools.lru_cache(maxsize=1)
def _tagger():
    import fugashi
    return fugashi.Tagger()          # unidic-lite: the dictionary comes from PyPI, nothing downloaded


def ja_tokens(text: str) -> list[str]:
    """Words of a Japanese text (MeCab via fugashi), NFKC-normalised, lower case, without particles and punctuation."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return [w.surface for w in _tagger()(text) if w.feature.pos1 not in STOP_POS and w.surface.strip()]


def whitespace_tokens(text: str) -> list[str]:
    """What an English-minded BM25 does: split on spaces (Japanese has none, so whole sentences become tokens)."""
    return unicodedata.normalize("NFKC", text or "").lower().split()


class BM25Index:
    """``rank_bm25.BM25Okapi`` over chunks with a chosen tokenizer; ties keep corpus order."""

    def __init__(self, chunks: Sequence, tokenize: Callable[[str], list[str]] = ja_tokens):
        from rank_bm25 import BM25Okapi
        self.chunks, self.tokenize = list(chunks), tokenize
        if not self.chunks:
            raise rag.EmptyCorpusError("No chunks to index: the corpus produced no text.")
        corpus = [tokenize(c.page_content) or [""] for c in self.chunks]   # BM25Okapi rejects empty documents
        self.bm25 = BM25Okapi(corpus)

    def scores(self, query: str):
        return self.bm25.get_scores(self.tokenize(query))

    def search(self, query: str, k: int) -> list[tuple[Any, float]]:
        import numpy as np
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.chunks[i], float(scores[i])) for i in order]


# --------------------------------------------------------------------------- fusion and retriever
def rrf_fuse(rankings: Sequence[Sequence[Hashable]], k: int = 60) -> list[tuple[Hashable, float]]:
    """Reciprocal rank fusion (Cormack et al., 2009): score(d) = Σ over rankings of 1 / (k + rank of d),
    ranks from 1. Returns ``(item, score)`` best first; ties keep the order of first appearance."""
    if k < 0:
        raise ValueError(f"the RRF constant k must be non-negative, got {k}")
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])     # sorted() is stable


class JapaneseRetriever(BaseRetriever):
    """A LangChain retriever over the same chunks: ``mode`` = ``"bm25"``, ``"dense"`` (a FAISS
    vector store) or ``"hybrid"`` (RRF of the top ``candidates`` of both)."""

    bm25: Any = None
    dense: Any = None
    mode: str = "hybrid"
    k: int = 4
    candidates: int = 20
    rrf_k: int = 60

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list:
        if self.mode not in ("bm25", "dense", "hybrid"):
            raise ValueError(f"mode must be 'bm25', 'dense' or 'hybrid', got {self.mode!r}")
        if self.mode == "bm25":
            return [d for d, _ in self.bm25.search(query, self.k)]
        if self.mode == "dense":
            return self.dense.similarity_search(query, k=self.k)
        lexical = [d for d, _ in self.bm25.search(query, self.candidates)]
        semantic = self.dense.similarity_search(query, k=self.candidates)
        by_key = {d.metadata["chunk"]: d for d in semantic + lexical}
        fused = rrf_fuse([[d.metadata["chunk"] for d in lexical], [d.metadata["chunk"] for d in semantic]], k=self.rrf_k)
        return [by_key[key] for key, _ in fused[:self.k]]


def build_retrievers(chunks: Sequence, embeddings, *, k: int = 4, dense_name: str = "MiniLM") -> dict[str, JapaneseRetriever]:
    """The four retrievers the chapter compares, over the same chunks (one FAISS index, two BM25 indexes)."""
    index = rag.build_index(chunks, embeddings)
    bm25_ja, bm25_ws = BM25Index(chunks, ja_tokens), BM25Index(chunks, whitespace_tokens)
    return {"BM25 (whitespace)": JapaneseRetriever(bm25=bm25_ws, mode="bm25", k=k),
            "BM25 (fugashi)": JapaneseRetriever(bm25=bm25_ja, mode="bm25", k=k),
            f"dense ({dense_name})": JapaneseRetriever(dense=index, mode="dense", k=k),
            f"hybrid RRF (fugashi BM25 + {dense_name})": JapaneseRetriever(bm25=bm25_ja, dense=index, mode="hybrid", k=k)}


def evaluate_retrievers(retrievers: dict, questions: Sequence[dict], ks: Sequence[int] = (1, 3, 5)) -> list[dict]:
    """Recall@k and MRR@k (``labkit.rag``'s metrics) per retriever and k, and milliseconds per question."""
    gold = [q["doc_id"] for q in questions]
    rows = []
    for name, retriever in retrievers.items():
        deep = retriever.model_copy(update={"k": max(ks)})
        t0 = time.perf_counter()
        rankings = [[d.metadata["doc_id"] for d in deep.invoke(q["question"])] for q in questions]
        ms = (time.perf_counter() - t0) * 1000 / len(questions)
        rows += [{"retriever": name, "k": k, "recall": rag.recall_at_k(rankings, gold, k),
                  "mrr": rag.mrr(rankings, gold, k), "ms/question": ms} for k in ks]
    return rows


# --------------------------------------------------------------------------- answers
JA_RAG_SYSTEM = ("あなたはケルヴェイン諸島についての質問に、与えられた文脈だけを使って答えます。"
                 "数語の短い答えを日本語で書いてください。文脈に答えがなければ「わかりません」と答えてください。")


def rag_prompt(system: str = JA_RAG_SYSTEM):
    """The chapter's prompt shape (``context``, ``question``) in Japanese."""
    from langchain_core.prompts import ChatPromptTemplate
    return ChatPromptTemplate.from_messages([("system", system), ("human", "文脈:\n{context}\n\n質問: {question}\n短い答え:")])


def _fold(text: str) -> str:
    """NFKC (full-width digits → ASCII), lower case, without spaces, punctuation, thousands separators."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return "".join(ch for ch in text if ch.isalnum())


def is_correct(answer: str, gold: str, aliases: Sequence[str] = ()) -> bool:
    """True when the folded gold answer (or an alias) occurs in the folded answer, with no digit
    right before or after it (so "41" is not found in "141")."""
    folded = _fold(answer)
    for g in (gold, *aliases):
        g = _fold(g) if g else ""
        if g and re.search(rf"(?<!\d){re.escape(g)}(?!\d)", folded):
            return True
    return False


_JA_REFUSALS = re.compile(r"わかりません|分かりません|わからない|分からない|不明|記載(が|は)?(ありません|ない)|"
                          r"(書かれて|含まれて|述べられて)(い)?(ません|ない)|答えられません")


def is_refusal(answer: str) -> bool:
    """A Japanese (or English) "I don't know"-style reply, or an empty one."""
    return rag.is_refusal(answer) or bool(_JA_REFUSALS.search(answer or ""))


def score(question: dict, answer: str) -> bool:
    """Correct answer for an answerable question; a refusal for an unanswerable one."""
    if question["doc_id"] is None:
        return is_refusal(answer)
    return not is_refusal(answer) and is_correct(answer, question["answer"], question.get("aliases", ()))


def japanese_share(text: str) -> float:
    """Share of the letters in ``text`` that are kana or kanji (0 for an all-English reply)."""
    letters = [ch for ch in text or "" if ch.isalpha()]
    japanese = [ch for ch in letters if unicodedata.name(ch, "").startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA"))]
    return len(japanese) / len(letters) if letters else 0.0


# --------------------------------------------------------------------------- multilingual embedders
@dataclass(frozen=True)
class EmbedderCard:
    """What a model card says about an embedder: the prefixes it was trained with, and its size."""

    name: str
    query_prefix: str
    passage_prefix: str
    dims: int
    note: str
    source: str


# Prefixes and dimensions as stated on each model card (linked); checked again when a model is loaded.
MULTILINGUAL_EMBEDDERS = {c.name: c for c in [
    EmbedderCard("intfloat/multilingual-e5-small", "query: ", "passage: ", 384, "multilingual, 118M parameters",
                 "https://huggingface.co/intfloat/multilingual-e5-small"),
    EmbedderCard("intfloat/multilingual-e5-base", "query: ", "passage: ", 768, "multilingual",
                 "https://huggingface.co/intfloat/multilingual-e5-base"),
    EmbedderCard("intfloat/multilingual-e5-large", "query: ", "passage: ", 1024, "multilingual",
                 "https://huggingface.co/intfloat/multilingual-e5-large"),
    EmbedderCard("BAAI/bge-m3", "", "", 1024, "multilingual, no prefixes, inputs up to 8192 tokens",
                 "https://huggingface.co/BAAI/bge-m3"),
    EmbedderCard("cl-nagoya/ruri-base", "クエリ: ", "文章: ", 768,
                 "Japanese, v1 (also -small/-large); needs fugashi, unidic-lite and sentencepiece",
                 "https://huggingface.co/cl-nagoya/ruri-base"),
    EmbedderCard("cl-nagoya/ruri-v3-30m", "検索クエリ: ", "検索文書: ", 256, "Japanese, v3 (ModernBERT-Ja)",
                 "https://huggingface.co/cl-nagoya/ruri-v3-30m"),
    EmbedderCard("cl-nagoya/ruri-v3-130m", "検索クエリ: ", "検索文書: ", 512, "Japanese, v3 (ModernBERT-Ja)",
                 "https://huggingface.co/cl-nagoya/ruri-v3-130m"),
    EmbedderCard("cl-nagoya/ruri-v3-310m", "検索クエリ: ", "検索文書: ", 768, "Japanese, v3 (ModernBERT-Ja)",
                 "https://huggingface.co/cl-nagoya/ruri-v3-310m"),
]}


class PrefixedEmbeddings(Embeddings):
    """Wraps any LangChain ``Embeddings`` and adds the model's query prefix in :meth:`embed_query`
    and its passage prefix in :meth:`embed_documents` — forgetting them costs retrieval quality
    silently, because the model still returns vectors."""

    def __init__(self, inner: Embeddings, query_prefix: str = "", passage_prefix: str = ""):
        self.inner, self.query_prefix, self.passage_prefix = inner, query_prefix, passage_prefix

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.inner.embed_documents([self.passage_prefix + t for t in texts])

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(self.query_prefix + text)


def _card(name: str) -> EmbedderCard:
    if name not in MULTILINGUAL_EMBEDDERS:
        raise ValueError(f"Unknown embedder {name!r}; known: {', '.join(MULTILINGUAL_EMBEDDERS)}. "
                         "For another model, wrap it yourself: PrefixedEmbeddings(inner, query_prefix, passage_prefix).")
    return MULTILINGUAL_EMBEDDERS[name]


def missing_reason(name: str) -> str | None:
    """``None`` when the model is in the local Hugging Face cache, else why it cannot be used here."""
    _card(name)
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    return (f"{name} is not in the local Hugging Face cache and nothing is downloaded at run time "
            f"(HF_HUB_OFFLINE). On a machine with internet access: hf download {name}")


def multilingual_embeddings(name: str, *, device: str = "cpu") -> PrefixedEmbeddings:
    """A cached multilingual embedder with its card's prefixes applied; :class:`ModelNotFoundError` if not cached."""
    card = _card(name)
    reason = missing_reason(name)
    if reason:
        raise ModelNotFoundError(reason)
    from langchain_huggingface import HuggingFaceEmbeddings
    inner = HuggingFaceEmbeddings(model_name=name, model_kwargs={"device": device, "local_files_only": True},
                                  encode_kwargs={"normalize_embeddings": True})
    wrapped = PrefixedEmbeddings(inner, card.query_prefix, card.passage_prefix)
    dims = len(wrapped.embed_query("テスト"))
    if dims != card.dims:
        raise ValueError(f"{name} returned {dims}-dimensional vectors but its card says {card.dims}: "
                         "check that the cached files are the model you meant.")
    return wrapped
