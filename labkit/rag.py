"""Retrieval-augmented generation, fully local, and how to evaluate it (chapter 05).

The pipeline, with current LangChain packages only (``langchain_core``, ``langchain_text_splitters``,
the partner packages ``langchain_huggingface`` / ``langchain_openai`` / ``langchain_ollama``, and
``langchain_community`` for FAISS and the file loaders):

1. :func:`load_corpus` reads a folder file by file (Markdown/text with ``TextLoader``, HTML with
   ``BSHTMLLoader``). A file that fails to load is *reported* in :attr:`LoadReport.errors` and
   skipped; the others load. A corpus with nothing loadable raises :class:`EmptyCorpusError`.
2. :func:`split_documents` cuts documents into overlapping chunks (``RecursiveCharacterTextSplitter``).
3. :func:`embedding_model` embeds with the bundled all-MiniLM-L6-v2 — a dedicated sentence-embedding
   model, not a chat model — and :func:`build_index` stores the vectors in a FAISS index
   (:func:`save_index` / :func:`load_index`).
4. :class:`RAG` wires retriever → prompt → chat model → parser as an LCEL chain that returns the
   answer *with its sources*, and checks that a question fits the model's context window
   (:class:`QuestionTooLongError` otherwise; retrieved chunks that do not fit are dropped).

Evaluation on a labelled question set (:func:`load_questions`):

* **retrieval** — :func:`recall_at_k` (share of answerable questions whose source document is
  among the top-k retrieved *chunks*) and :func:`mrr` (mean reciprocal rank of the first chunk
  from that document, 0 when it is not in the top k); :func:`sweep` repeats both over chunk
  sizes × k;
* **answers** — :func:`is_correct`: after :func:`normalize` (lower case, punctuation and
  thousands separators removed), the gold answer or one of its aliases must appear as whole
  words inside the model's answer. Deliberately simple and strict about *content*, lenient about
  *phrasing*; it cannot tell "not 40" from "40", so keep answers short (``max_tokens``).
* **refusals** — :func:`is_refusal` spots "I don't know"-style replies; on unanswerable
  questions a refusal is the right answer.

>>> normalize("St. Wenna's Infirmary, 180,000 beds!")
'st wenna s infirmary 180000 beds'
>>> is_correct("It is about 180,000 books.", "180,000"), is_correct("Mark 1874", "74")
(True, False)
>>> is_refusal("I don't know."), is_refusal("Port Ambrel")
(True, False)
>>> recall_at_k([["a", "b"], ["c", "d"]], ["b", "x"], k=2), mrr([["a", "b"], ["c", "d"]], ["b", "x"], k=2)
(0.5, 0.25)
"""
from __future__ import annotations

import json
import math
import re
import statistics
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import engines, env
from .errors import LabkitError

DATA_DIR = env.DATA_DIR / "rag"
DOCS_DIR = DATA_DIR / "docs"
QUESTIONS_PATH = DATA_DIR / "questions.jsonl"

# langchain_community prints a "being sunset" DeprecationWarning on import. It still hosts the
# FAISS vector store and the file loaders, so chapter 05 uses it and says so in the text.
warnings.filterwarnings("ignore", message=r".*langchain-community. is being sunset", category=DeprecationWarning)


class RAGError(LabkitError):
    """Base class of this module's errors."""


class EmptyCorpusError(RAGError, ValueError):
    """Nothing could be loaded or indexed: no files, only empty files, or only files that failed."""


class QuestionTooLongError(RAGError, ValueError):
    """The question alone does not fit the model's context window next to the prompt and answer."""


# --------------------------------------------------------------------------- loading
TEXT_SUFFIXES = (".md", ".markdown", ".txt")
HTML_SUFFIXES = (".html", ".htm")


@dataclass
class LoadReport:
    """What :func:`load_corpus` found: the documents that loaded and one line per file that did not."""

    documents: list
    errors: list[tuple[str, str]] = field(default_factory=list)   # (file name, reason)
    files_seen: int = 0

    def summary(self) -> str:
        lines = [f"{len(self.documents)} documents loaded from {self.files_seen} files"
                 + (f"; {len(self.errors)} skipped:" if self.errors else "")]
        lines += [f"  - {name}: {reason}" for name, reason in self.errors]
        return "\n".join(lines)


def _loader_for(path: Path):
    """The LangChain loader for a file, or raise ``ValueError`` saying what is missing."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        from langchain_community.document_loaders import TextLoader
        return TextLoader(str(path), encoding="utf-8")
    if suffix in HTML_SUFFIXES:
        from langchain_community.document_loaders import BSHTMLLoader
        # BeautifulSoup's built-in parser: the loader's default ("lxml") is an extra package.
        return BSHTMLLoader(str(path), open_encoding="utf-8", bs_kwargs={"features": "html.parser"},
                            get_text_separator=" ")
    if suffix == ".pdf":
        import importlib.util
        if importlib.util.find_spec("pypdf") is None:
            raise ValueError("PDF needs the `pypdf` package (pip install pypdf), which is not installed")
        from langchain_community.document_loaders import PyPDFLoader
        return PyPDFLoader(str(path))
    raise ValueError(f"no loader for {suffix or 'files without a suffix'!r} "
                     f"(supported: {', '.join(TEXT_SUFFIXES + HTML_SUFFIXES)}, .pdf with pypdf)")


def load_corpus(folder: str | Path = DOCS_DIR, *, pattern: str = "*") -> LoadReport:
    """Load every file under ``folder`` matching ``pattern``, one loader per file.

    Each document gets ``metadata["doc_id"]`` (the file name without suffix — what the
    question set refers to), ``source`` (the file name) and ``format``. Failures (undecodable
    bytes, empty files, unknown formats, parser errors) are collected, not raised, so one bad
    file cannot stop the pipeline; :class:`EmptyCorpusError` is raised only when *nothing* loads.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EmptyCorpusError(f"The corpus folder {folder} does not exist. Point load_corpus() at the "
                               f"folder holding your .md/.txt/.html files (the workbook's is {DOCS_DIR}).")
    files = sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    report = LoadReport(documents=[], files_seen=len(files))
    for path in files:
        name = str(path.relative_to(folder))
        try:
            docs = _loader_for(path).load()
        except Exception as exc:   # loaders wrap the real cause (e.g. UnicodeDecodeError) in RuntimeError
            cause = exc.__cause__ or exc
            reason = f"{type(cause).__name__}: {cause}"
            if isinstance(cause, UnicodeDecodeError):
                reason = f"not valid UTF-8 text ({cause.reason} at byte {cause.start}); re-save it as UTF-8"
            report.errors.append((name, reason))
            continue
        docs = [d for d in docs if d.page_content.strip()]
        if not docs:
            report.errors.append((name, "empty file (no text after loading)"))
            continue
        for d in docs:
            d.metadata.update(doc_id=path.stem, source=name, format=path.suffix.lower().lstrip("."))
        report.documents.extend(docs)
    if not report.documents:
        why = "it has no files" if not files else "no file could be loaded:\n" + report.summary()
        raise EmptyCorpusError(f"The corpus in {folder} is empty: {why}\n"
                               "Add at least one non-empty .md, .txt or .html file.")
    return report


def split_documents(documents: Sequence, *, chunk_size: int = 400, chunk_overlap: int | None = None) -> list:
    """Split into chunks of at most ``chunk_size`` characters (default overlap: 15%).

    Each chunk keeps its document's metadata plus ``start_index`` (character offset) and ``chunk``
    (a running number, handy to cite).
    """
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    if not documents:
        raise EmptyCorpusError("No documents to split: load_corpus() returned none.")
    if chunk_overlap is None:
        chunk_overlap = chunk_size * 15 // 100
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be between 0 and chunk_size - 1 ({chunk_size - 1}), got {chunk_overlap}")
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, add_start_index=True)
    chunks = splitter.split_documents(list(documents))
    for i, c in enumerate(chunks):
        c.metadata["chunk"] = i
    return chunks


def load_questions(path: str | Path = QUESTIONS_PATH) -> list[dict]:
    """The labelled question set: one JSON object per line with ``id``, ``question``, ``doc_id``
    (``null`` when the corpus cannot answer it), ``answer`` and optional ``aliases``."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"id", "question", "doc_id", "answer"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {sorted(missing)}")
        if row["doc_id"] is not None and not row["answer"]:
            raise ValueError(f"{path}:{n}: an answerable question needs a gold answer")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- index
def embedding_model(name: str = "minilm", *, device: str = "cpu"):
    """``HuggingFaceEmbeddings`` on a bundled (or local) sentence-embedding model, normalised vectors.

    Normalised vectors make the inner product equal to cosine similarity (:func:`build_index`).
    """
    from langchain_huggingface import HuggingFaceEmbeddings

    from . import models
    return HuggingFaceEmbeddings(model_name=str(models.get(name)), model_kwargs={"device": device},
                                 encode_kwargs={"normalize_embeddings": True})


def build_index(chunks: Sequence, embeddings):
    """A FAISS index over ``chunks``; scores are cosine similarities (higher = closer)."""
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy

    from .env import progress
    chunks = list(chunks)
    if not chunks:
        raise EmptyCorpusError("No chunks to index: the corpus produced no text.")
    texts = [c.page_content for c in chunks]
    batches = range(0, len(texts), 64)       # embedded in batches so a progress bar can show the slow part
    vectors = [v for i in progress(batches, f"embedding {len(texts)} chunks") for v in embeddings.embed_documents(texts[i:i + 64])]
    return FAISS.from_embeddings(list(zip(texts, vectors)), embeddings, metadatas=[c.metadata for c in chunks],
                                 ids=[c.id for c in chunks] if all(getattr(c, "id", None) for c in chunks) else None,
                                 distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)


def save_index(index, folder: str | Path) -> Path:
    """Write the index (``index.faiss``: vectors; ``index.pkl``: chunks and metadata) to ``folder``."""
    folder = Path(folder)
    index.save_local(str(folder))
    return folder


def load_index(folder: str | Path, embeddings):
    """Load an index written by :func:`save_index`.

    ``index.pkl`` is a pickle, and unpickling can run code: LangChain therefore requires
    ``allow_dangerous_deserialization=True``. Only load indexes you built yourself.
    """
    from langchain_community.vectorstores import FAISS
    folder = Path(folder)
    if not (folder / "index.faiss").exists() or not (folder / "index.pkl").exists():
        raise FileNotFoundError(f"No saved FAISS index in {folder} (expected index.faiss and index.pkl); "
                                "build one with build_index() and save_index().")
    return FAISS.load_local(str(folder), embeddings, allow_dangerous_deserialization=True)


# --------------------------------------------------------------------------- retrieval metrics
def _answerable(rankings: Sequence[Sequence[str]], gold: Sequence[str | None]):
    if len(rankings) != len(gold):
        raise ValueError(f"{len(rankings)} rankings but {len(gold)} gold ids")
    pairs = [(r, g) for r, g in zip(rankings, gold) if g is not None]
    if not pairs:
        raise ValueError("no answerable questions (every gold doc id is None)")
    return pairs


def recall_at_k(rankings: Sequence[Sequence[str]], gold: Sequence[str | None], k: int) -> float:
    """Share of answerable questions whose gold doc id is among the first ``k`` retrieved chunks.

    ``rankings[i]`` lists the doc ids of the chunks retrieved for question i, best first;
    unanswerable questions (gold ``None``) are left out.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    pairs = _answerable(rankings, gold)
    return sum(g in list(r)[:k] for r, g in pairs) / len(pairs)


def mrr(rankings: Sequence[Sequence[str]], gold: Sequence[str | None], k: int | None = None) -> float:
    """Mean reciprocal rank of the first chunk from the gold document (0 if not in the top ``k``)."""
    pairs = _answerable(rankings, gold)
    total = 0.0
    for r, g in pairs:
        r = list(r)[:k] if k else list(r)
        total += 1.0 / (r.index(g) + 1) if g in r else 0.0
    return total / len(pairs)


def rank_doc_ids(index, questions: Sequence[str], k: int, embeddings=None, vectors=None) -> list[list[str]]:
    """The doc ids of the top-``k`` chunks for each question (embed once, pass ``vectors`` to reuse)."""
    if vectors is None:
        vectors = embeddings.embed_documents(list(questions))
    return [[d.metadata["doc_id"] for d, _ in index.similarity_search_with_score_by_vector(v, k=k)]
            for v in vectors]


def sweep(documents: Sequence, questions: Sequence[dict], embeddings, *,
          chunk_sizes: Iterable[int] = (200, 400, 800), ks: Iterable[int] = (1, 2, 4, 8)) -> list[dict]:
    """Recall@k and MRR@k for every chunk size × k: one index per chunk size, questions embedded once."""
    ks = sorted(set(ks))
    texts = [q["question"] for q in questions]
    gold = [q["doc_id"] for q in questions]
    from .env import progress
    vectors = embeddings.embed_documents(texts)
    rows = []
    for size in progress(list(chunk_sizes), "chunk-size sweep"):
        t0 = time.perf_counter()
        chunks = split_documents(documents, chunk_size=size)
        index = build_index(chunks, embeddings)
        build_s = time.perf_counter() - t0
        rankings = rank_doc_ids(index, texts, max(ks), vectors=vectors)
        for k in ks:
            rows.append({"chunk_size": size, "k": k, "chunks": len(chunks), "recall": recall_at_k(rankings, gold, k),
                         "mrr": mrr(rankings, gold, k), "build_s": build_s})
    return rows


# --------------------------------------------------------------------------- answer scoring
_REFUSALS = re.compile(
    r"\b(i\s+(do\s+not|don'?t|dont)\s+know"
    r"|(can ?not|can'?t|unable to|not able to)\s+(answer|find|tell|say|determine|provide)"
    r"|not\s+(mentioned|stated|given|provided|specified|found|available|in the (context|text|documents?))"
    r"|(context|text|documents?)\s+(does\s+not|doesn'?t)\s+(say|mention|contain|provide|include)"
    r"|no\s+(information|mention|answer|data)"
    r"|unknown|not sure)\b", re.IGNORECASE)


def normalize(text: str) -> str:
    """Lower case, typographic quotes folded, thousands separators and punctuation removed, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d)[,\u202f\u00a0 ](?=\d{3}\b)", "", text)     # 180,000 / 180 000 → 180000
    text = re.sub(r"[^\w]+|_", " ", text)
    return " ".join(text.split())


def is_correct(answer: str, gold: str, aliases: Sequence[str] = ()) -> bool:
    """True when the normalised gold answer (or an alias) appears as whole words in the answer."""
    padded = f" {normalize(answer)} "
    return any(f" {normalize(g)} " in padded for g in [gold, *aliases] if g and normalize(g))


def is_refusal(answer: str) -> bool:
    """True for "I don't know" / "not in the context"-style answers (and for an empty answer)."""
    return not (answer or "").strip() or bool(_REFUSALS.search(answer.replace("\u2019", "'")))


def score(question: dict, answer: str) -> bool:
    """Correct answer for an answerable question; a refusal for an unanswerable one."""
    if question["doc_id"] is None:
        return is_refusal(answer)
    return not is_refusal(answer) and is_correct(answer, question["answer"], question.get("aliases", ()))


# --------------------------------------------------------------------------- generation
RAG_SYSTEM = ("You answer questions about the Kelvane Islands using only the context. "
              "Reply with a short answer of a few words. If the context does not contain the answer, "
              "reply: I don't know.")
CLOSED_BOOK_SYSTEM = "Answer the question with a short answer of a few words."


def rag_prompt(system: str = RAG_SYSTEM):
    from langchain_core.prompts import ChatPromptTemplate
    return ChatPromptTemplate.from_messages(
        [("system", system), ("human", "Context:\n{context}\n\nQuestion: {question}\nShort answer:")])


def closed_book_prompt(system: str = CLOSED_BOOK_SYSTEM):
    from langchain_core.prompts import ChatPromptTemplate
    return ChatPromptTemplate.from_messages([("system", system), ("human", "Question: {question}\nShort answer:")])


def chat_model_spec(server, *, max_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                    **options) -> tuple[type, dict]:
    """The LangChain chat-model class for a :class:`labkit.Server` (its engine's ``chat_model`` in
    :mod:`labkit.engines`) and its keyword arguments: ``ChatOllama`` for the ``ollama`` engine (Ollama's
    own API), ``ChatOpenAI`` on ``/v1`` for ``llama.cpp``, ``llama-server`` and ``vllm`` (plain: what llama-cpp-python's
    server cannot take as LangChain sends it, labkit's layer in front of it translates, :mod:`labkit.llama_cpp_openai`).
    ``options`` are passed on as they are (``model=``, ``timeout=``, ``output_version=``, ...)."""
    chat = engines.get(server.engine).chat_model if server.engine in engines.names() else None
    if chat == "langchain_ollama:ChatOllama":
        return engines.resolve(chat), {"base_url": server.base_url, "model": server.model, "temperature": temperature,
                                       "num_predict": max_tokens, "seed": seed, **options}
    cls = engines.resolve(chat or "langchain_openai:ChatOpenAI")
    # stream_usage: token counts for streams too (ChatOpenAI asks for them only from api.openai.com).
    return cls, {"base_url": server.base_url + "/v1", "api_key": server.api_key or "none", "model": server.model,
                 "temperature": temperature, "max_tokens": max_tokens, "seed": seed, "max_retries": 0,
                 "stream_usage": True, **options}


def chat_model(server, **settings):
    """The LangChain chat model for a :class:`labkit.Server` (see :func:`chat_model_spec`)."""
    cls, kwargs = chat_model_spec(server, **settings)
    return cls(**kwargs)


def estimate_tokens(text: str) -> int:
    """A deliberately pessimistic token count (≈ 3 characters per token) when no tokenizer is at hand."""
    return math.ceil(len(text) / 3) if text else 0


def token_counter(model: str | Path | None = None) -> Callable[[str], int]:
    """An exact token counter for a GGUF model (its tokenizer only, no weights: ``vocab_only``);
    :func:`estimate_tokens` for anything else."""
    from . import models
    path = models.get(model)
    if not path.is_file():
        return estimate_tokens
    from llama_cpp import Llama
    try:                      # llama.cpp prints a context warning even for a tokenizer-only load
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:       # a private helper: fall back to a visible warning
        import contextlib
        suppress_stdout_stderr = lambda disable=False: contextlib.nullcontext()   # noqa: E731
    with suppress_stdout_stderr(disable=False):
        vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else 0


def format_docs(docs: Sequence) -> str:
    """Chunks as numbered context blocks, each with its source file."""
    return "\n\n".join(f"[{i}] ({d.metadata.get('source', '?')}) {d.page_content.strip()}" for i, d in enumerate(docs, 1))


def sources_of(docs: Sequence) -> list[str]:
    """Source files of the chunks, best first, without repeats."""
    return list(dict.fromkeys(d.metadata.get("source", "?") for d in docs))


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[str]
    docs: list
    retrieve_s: float = 0.0
    generate_s: float = 0.0
    dropped: int = 0            # retrieved chunks left out because they did not fit the context
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class RAG:
    """Retriever + chat model as one LCEL chain that returns ``{"question", "docs", "context",
    "sources", "dropped", "answer"}``.

    ``chain`` = ``retrieval`` | ``generation``:

    * ``retrieval``: check the question fits (:class:`QuestionTooLongError`), run the retriever,
      keep the best chunks that fit ``n_ctx`` next to the prompt and ``max_answer_tokens``;
    * ``generation``: ``prompt | llm | StrOutputParser()`` assigned to ``"answer"``.

    :meth:`ask` invokes the same two runnables one after the other to time them separately.
    """

    def __init__(self, retriever, llm, *, n_ctx: int = 2048, max_answer_tokens: int = 32,
                 count_tokens: Callable[[str], int] = estimate_tokens, prompt=None):
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
        self.retriever, self.llm, self.n_ctx = retriever, llm, n_ctx
        self.max_answer_tokens, self.count_tokens = max_answer_tokens, count_tokens
        self.prompt = prompt or rag_prompt()
        self.retrieval = (RunnableLambda(self.check_question, name="check_question")
                          | RunnableParallel(question=RunnablePassthrough(), docs=retriever)
                          | RunnableLambda(self._fit, name="fit_context"))
        self.generation = RunnablePassthrough.assign(answer=self.prompt | llm | StrOutputParser())
        self.chain = self.retrieval | self.generation

    # -- context budget
    def _overhead(self) -> int:
        empty = self.prompt.format(context="", question="")
        return self.count_tokens(empty) + 16 + self.max_answer_tokens   # 16: chat-template markers

    def check_question(self, question: str) -> str:
        """Return the question, or raise :class:`QuestionTooLongError` if it cannot fit at all."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("The question is empty: type a question.")
        need = self.count_tokens(question)
        room = self.n_ctx - self._overhead()
        if need > room:
            raise QuestionTooLongError(
                f"The question is {need} tokens, but the model's context window is {self.n_ctx} tokens and "
                f"{self.n_ctx - room} of them are needed for the instructions and the answer: at most {room} "
                "tokens are left for the question (and none for retrieved context). Shorten the question "
                "or start the engine with a larger context (n_ctx).")
        return question

    def _fit(self, inputs: dict) -> dict:
        question, docs = inputs["question"], list(inputs["docs"])
        room = self.n_ctx - self._overhead() - self.count_tokens(question)
        kept = []
        for d in docs:                          # best first; stop at the first chunk that does not fit
            if self.count_tokens(format_docs(kept + [d])) > room:
                break
            kept.append(d)
        return {"question": question, "docs": kept, "context": format_docs(kept),
                "sources": sources_of(kept), "dropped": len(docs) - len(kept)}

    # -- use
    def invoke(self, question: str) -> dict:
        return self.chain.invoke(question)

    def ask(self, question: str, *, raise_errors: bool = False) -> Answer:
        """Answer one question, timing retrieval and generation; errors become ``Answer.error``."""
        t0 = time.perf_counter()
        try:
            state = self.retrieval.invoke(question)
            t1 = time.perf_counter()
            out = self.generation.invoke(state)
        except Exception as exc:
            if raise_errors:
                raise
            return Answer(question if isinstance(question, str) else "", "", [], [],
                          retrieve_s=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        t2 = time.perf_counter()
        return Answer(question, out["answer"].strip(), out["sources"], out["docs"],
                      retrieve_s=t1 - t0, generate_s=t2 - t1, dropped=out["dropped"])


def closed_book_chain(llm, prompt=None):
    """The same chat model without retrieval: ``prompt | llm | StrOutputParser()`` (the baseline)."""
    from langchain_core.output_parsers import StrOutputParser
    return (prompt or closed_book_prompt()) | llm | StrOutputParser()


def evaluate_answers(rag: RAG, questions: Sequence[dict], *, closed_book=None) -> list[dict]:
    """Ask every question with retrieval (and, given a ``closed_book`` chain, without); one row each."""
    rows = []
    for q in questions:
        a = rag.ask(q["question"])
        row = {"id": q["id"], "answerable": q["doc_id"] is not None, "gold": q["answer"], "rag_answer": a.answer,
               "rag_correct": a.ok and score(q, a.answer), "rag_refused": a.ok and is_refusal(a.answer),
               "gold_retrieved": q["doc_id"] in [d.metadata["doc_id"] for d in a.docs],
               "retrieve_s": a.retrieve_s, "generate_s": a.generate_s, "error": a.error}
        if closed_book is not None:
            t0 = time.perf_counter()
            text = closed_book.invoke({"question": q["question"]}).strip()
            row.update(closed_answer=text, closed_correct=score(q, text), closed_refused=is_refusal(text),
                       closed_s=time.perf_counter() - t0)
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Accuracy on answerable questions with/without retrieval, refusals, and median latencies."""
    ans = [r for r in rows if r["answerable"]]
    una = [r for r in rows if not r["answerable"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")   # noqa: E731
    out = {"answerable": len(ans), "unanswerable": len(una),
           "rag_accuracy": mean([r["rag_correct"] for r in ans]),
           "rag_refusal_unanswerable": mean([r["rag_refused"] for r in una]),
           "rag_false_refusal": mean([r["rag_refused"] for r in ans]),
           "median_retrieve_s": statistics.median(r["retrieve_s"] for r in rows) if rows else float("nan"),
           "median_generate_s": statistics.median(r["generate_s"] for r in rows) if rows else float("nan"),
           "errors": sum(bool(r["error"]) for r in rows)}
    if rows and "closed_correct" in rows[0]:
        out.update(closed_accuracy=mean([r["closed_correct"] for r in ans]),
                   closed_refusal_unanswerable=mean([r["closed_refused"] for r in una]))
    return out


# --------------------------------------------------------------------------- widget
def qa_widget(rag: RAG, *, placeholder: str = "Ask about the Kelvane Islands…"):
    """A text box and a button: the answer, its sources and the timings appear below."""
    import ipywidgets as w
    box = w.Text(placeholder=placeholder, layout=w.Layout(width="70%"))
    button = w.Button(description="Ask", button_style="primary")
    out = w.Output()

    def on_ask(_=None):
        out.clear_output()
        a = rag.ask(box.value)
        if a.error:
            out.append_stdout(a.error + "\n")
            return
        out.append_stdout((a.answer or "(empty answer)") + "\n")
        out.append_stdout("sources: " + (", ".join(a.sources) or "none")
                          + f" | retrieve {a.retrieve_s * 1000:.0f} ms, generate {a.generate_s:.2f} s"
                          + (f" | {a.dropped} chunk(s) dropped to fit the context" if a.dropped else "") + "\n")

    button.on_click(on_ask)
    ui = w.VBox([w.HBox([box, button]), out])
    ui.ask = on_ask            # lets a script (or a test) press the button
    ui.text, ui.output = box, out
    return ui
