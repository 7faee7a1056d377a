"""labkit.rag: loading with per-file errors, splitting, FAISS index, LCEL chain, evaluation (chapter 05).

Unit tests use LangChain's fake chat model and a fake retriever; the index tests use the bundled
MiniLM; the last tests run the index and chain against real engines: ``llama.cpp`` (OpenAI-compatible
route, ``ChatOpenAI``) and ``ollama`` (``ChatOllama`` on Ollama's API — labkit's Ollama-compatible
server when no real Ollama is installed, as in CI).
"""
import json

import pytest

from labkit import rag
from labkit.rag import EmptyCorpusError, QuestionTooLongError


# --------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("answer, gold, aliases, expected", [
    ("The capital is Port Ambrel.", "Port Ambrel", (), True),
    ("the capital is port   ambrel!", "Port Ambrel", (), True),
    ("It is Ambrel.", "Port Ambrel", (), False),                 # partial names do not count
    ("It was built in 1874.", "74", (), False),                  # whole words only
    ("It holds about 180,000 books", "180,000", (), True),
    ("It holds 180 000 books", "180,000", (), True),
    ("St. Wenna’s Infirmary", "St Wenna's Infirmary", (), True),  # typographic apostrophe, dot
    ("nine strings", "9", ("nine",), True),
    ("60% of it", "60 percent", ("60%",), True),
    ("", "Wend", (), False),
])
def test_is_correct(answer, gold, aliases, expected):
    assert rag.is_correct(answer, gold, aliases) is expected


@pytest.mark.parametrize("text, expected", [
    ("I don't know.", True), ("I do not know", True), ("I dont know", True), ("I don’t know", True),
    ("The context does not mention it.", True), ("That is not mentioned in the text.", True),
    ("I cannot answer that.", True), ("There is no information about it.", True), ("", True),
    ("Port Ambrel", False), ("The Moot has 41 seats.", False), ("Knowledge is power", False),
])
def test_is_refusal(text, expected):
    assert rag.is_refusal(text) is expected


def test_score_answerable_and_unanswerable():
    q = {"id": "x", "question": "?", "doc_id": "d", "answer": "Wend"}
    assert rag.score(q, "It is Wend.") and not rag.score(q, "Carra")
    assert not rag.score(q, "I don't know, maybe Wend")          # a hedge is not an answer
    u = {"id": "y", "question": "?", "doc_id": None, "answer": None}
    assert rag.score(u, "I don't know.") and not rag.score(u, "It is 42.")


# --------------------------------------------------------------------------- retrieval metrics
def test_recall_and_mrr():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"], ["a"]]
    gold = ["a", "b", "a", None]                                 # the last one is unanswerable: ignored
    assert rag.recall_at_k(rankings, gold, 1) == pytest.approx(1 / 3)
    assert rag.recall_at_k(rankings, gold, 3) == pytest.approx(2 / 3)
    assert rag.mrr(rankings, gold) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert rag.mrr(rankings, gold, k=2) == pytest.approx(1 / 3)


def test_metric_errors():
    with pytest.raises(ValueError, match="k must be at least 1"):
        rag.recall_at_k([["a"]], ["a"], 0)
    with pytest.raises(ValueError, match="no answerable"):
        rag.recall_at_k([["a"]], [None], 1)
    with pytest.raises(ValueError, match="2 rankings but 1"):
        rag.mrr([["a"], ["b"]], ["a"])


# --------------------------------------------------------------------------- the data set
def test_corpus_loads_cleanly_in_several_formats():
    report = rag.load_corpus()
    assert 30 <= len(report.documents) <= 60 and not report.errors
    formats = {d.metadata["format"] for d in report.documents}
    assert {"md", "txt", "html"} <= formats
    html = [d for d in report.documents if d.metadata["format"] == "html"]
    assert all("<" not in d.page_content for d in html)          # tags stripped by BSHTMLLoader
    assert len({d.metadata["doc_id"] for d in report.documents}) == len(report.documents)


def test_question_set_is_consistent_with_the_corpus():
    questions = rag.load_questions()
    docs = {d.metadata["doc_id"]: d.page_content for d in rag.load_corpus().documents}
    assert len(questions) >= 40 and len({q["id"] for q in questions}) == len(questions)
    unanswerable = [q for q in questions if q["doc_id"] is None]
    assert len(unanswerable) >= 5
    for q in questions:
        if q["doc_id"] is not None:
            assert q["doc_id"] in docs, q
            # the gold answer (or an alias) is literally in its document, so the scorer can match it
            assert rag.is_correct(docs[q["doc_id"]], q["answer"], q.get("aliases", ())), q


def test_load_questions_rejects_bad_rows(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "?", "doc_id": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: missing field"):
        rag.load_questions(bad)
    bad.write_text(json.dumps({"id": "1", "question": "?", "doc_id": "a", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match="needs a gold answer"):
        rag.load_questions(bad)


# --------------------------------------------------------------------------- bad input
def test_a_file_that_fails_is_reported_and_the_rest_load(tmp_path):
    (tmp_path / "good.md").write_text("# Good\nThe Moot has 41 seats.\n")
    (tmp_path / "page.html").write_text("<html><body><p>Old Bess is a whale.</p></body></html>")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 on Drest".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    report = rag.load_corpus(tmp_path)
    assert sorted(d.metadata["doc_id"] for d in report.documents) == ["good", "page"]
    errors = dict(report.errors)
    assert set(errors) == {"latin1.txt", "empty.txt", "scan.pdf", "data.xlsx"}
    assert "UTF-8" in errors["latin1.txt"] and "empty" in errors["empty.txt"]
    assert "pypdf" in errors["scan.pdf"] and "no loader" in errors["data.xlsx"]
    assert "4 skipped" in report.summary() and "latin1.txt" in report.summary()


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(EmptyCorpusError, match="has no files"):
        rag.load_corpus(tmp_path)
    (tmp_path / "empty.md").write_text("")
    with pytest.raises(EmptyCorpusError, match=r"(?s)no file could be loaded.*empty.md"):
        rag.load_corpus(tmp_path)
    with pytest.raises(EmptyCorpusError, match="does not exist"):
        rag.load_corpus(tmp_path / "nope")
    with pytest.raises(EmptyCorpusError):
        rag.split_documents([])
    with pytest.raises(EmptyCorpusError):
        rag.build_index([], embeddings=None)


def test_split_documents():
    docs = rag.load_corpus().documents
    chunks = rag.split_documents(docs, chunk_size=120)
    assert len(chunks) > len(docs) and all(len(c.page_content) <= 120 for c in chunks)
    assert all({"doc_id", "source", "start_index", "chunk"} <= c.metadata.keys() for c in chunks)
    with pytest.raises(ValueError, match="chunk_overlap"):
        rag.split_documents(docs, chunk_size=100, chunk_overlap=100)


# --------------------------------------------------------------------------- chain (fake model)
def _fake_pipeline(responses, docs=None, **kwargs):
    from langchain_core.documents import Document
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.runnables import RunnableLambda
    docs = docs or [Document(page_content="The Moot has 41 seats.", metadata={"doc_id": "parliament", "source": "parliament.txt"}),
                    Document(page_content="Wend is the smallest island.", metadata={"doc_id": "wend", "source": "wend.txt"})]
    llm = FakeListChatModel(responses=responses)
    return rag.RAG(RunnableLambda(lambda q: docs), llm, **kwargs), llm


def test_chain_returns_answer_and_sources():
    pipe, _ = _fake_pipeline(["The Moot has 41 seats."])
    out = pipe.invoke("How many seats does the Moot have?")
    assert out["answer"] == "The Moot has 41 seats."
    assert out["sources"] == ["parliament.txt", "wend.txt"] and out["dropped"] == 0
    assert "[1] (parliament.txt) The Moot has 41 seats." in out["context"]
    a = pipe.ask("How many seats does the Moot have?")
    assert a.ok and a.answer and a.retrieve_s >= 0 and a.generate_s >= 0


def test_question_longer_than_the_context():
    pipe, _ = _fake_pipeline(["41", "41"], n_ctx=256)
    long_q = "Tell me about the Moot. " * 100
    with pytest.raises(QuestionTooLongError, match=r"context window is 256 tokens.*Shorten the question"):
        pipe.invoke(long_q)
    a = pipe.ask(long_q)                        # the pipeline reports it and keeps working
    assert not a.ok and "QuestionTooLongError" in a.error
    assert pipe.ask("How many seats?").answer == "41"
    assert "empty" in pipe.ask("   ").error


def test_chunks_that_do_not_fit_are_dropped_best_first():
    from langchain_core.documents import Document
    docs = [Document(page_content=f"fact number {i} " * 20, metadata={"doc_id": f"d{i}", "source": f"d{i}.md"}) for i in range(5)]
    pipe, _ = _fake_pipeline(["ok"], docs=docs, n_ctx=400)
    out = pipe.invoke("Which fact?")
    assert 0 < len(out["docs"]) < 5 and out["dropped"] == 5 - len(out["docs"])
    assert out["sources"][0] == "d0.md"         # the best-ranked chunk is kept


def test_evaluate_and_summarize_with_a_fake_model():
    questions = [{"id": "1", "question": "Seats?", "doc_id": "parliament", "answer": "41"},
                 {"id": "2", "question": "Smallest?", "doc_id": "wend", "answer": "Wend"},
                 {"id": "3", "question": "Anthem?", "doc_id": None, "answer": None}]
    pipe, _ = _fake_pipeline(["41 seats", "Carra", "I don't know"])
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    closed = rag.closed_book_chain(FakeListChatModel(responses=["10", "Wend", "It is Hail Kelvane"]))
    rows = rag.evaluate_answers(pipe, questions, closed_book=closed)
    s = rag.summarize(rows)
    assert s["rag_accuracy"] == 0.5 and s["closed_accuracy"] == 0.5
    assert s["rag_refusal_unanswerable"] == 1.0 and s["closed_refusal_unanswerable"] == 0.0
    assert rows[0]["gold_retrieved"] and s["errors"] == 0


def test_qa_widget_answers_and_reports_errors():
    pipe, _ = _fake_pipeline(["41 seats"], n_ctx=256)
    ui = rag.qa_widget(pipe)
    ui.text.value = "How many seats?"
    ui.ask()
    text = "".join(o.get("text", "") for o in ui.output.outputs)
    assert "41 seats" in text and "parliament.txt" in text
    ui.text.value = "word " * 2000
    ui.ask()
    assert "QuestionTooLongError" in "".join(o.get("text", "") for o in ui.output.outputs)


# --------------------------------------------------------------------------- index (MiniLM)
@pytest.fixture(scope="module")
def embeddings():
    return rag.embedding_model("minilm")


@pytest.fixture(scope="module")
def index(embeddings):
    return rag.build_index(rag.split_documents(rag.load_corpus().documents, chunk_size=400), embeddings)


def test_index_recall_save_and_load(index, embeddings, tmp_path):
    questions = rag.load_questions()
    texts, gold = [q["question"] for q in questions], [q["doc_id"] for q in questions]
    rankings = rag.rank_doc_ids(index, texts, 4, embeddings)
    assert rag.recall_at_k(rankings, gold, 4) >= 0.8
    assert 0 < rag.mrr(rankings, gold, 4) <= rag.recall_at_k(rankings, gold, 4)
    rag.save_index(index, tmp_path / "idx")
    again = rag.load_index(tmp_path / "idx", embeddings)
    assert rag.rank_doc_ids(again, texts, 4, embeddings) == rankings
    hit, score = index.similarity_search_with_score("How many seats does the Moot have?", k=1)[0]
    assert hit.metadata["doc_id"] == "parliament" and 0 < score <= 1.0001    # cosine similarity
    with pytest.raises(FileNotFoundError, match="No saved FAISS index"):
        rag.load_index(tmp_path / "missing", embeddings)


def test_sweep_rows(embeddings):
    docs = rag.load_corpus().documents
    questions = rag.load_questions()[:10]
    rows = rag.sweep(docs, questions, embeddings, chunk_sizes=(150, 400), ks=(1, 4))
    assert [(r["chunk_size"], r["k"]) for r in rows] == [(150, 1), (150, 4), (400, 1), (400, 4)]
    small, large = rows[0]["chunks"], rows[2]["chunks"]
    assert small > large
    assert all(r["recall"] >= r["mrr"] > 0 for r in rows)
    assert rows[1]["recall"] >= rows[0]["recall"]            # more chunks retrieved never lowers recall


# --------------------------------------------------------------------------- real engines
@pytest.mark.full      # chapter 05 builds the index and runs the chain on a real engine in make test
@pytest.mark.parametrize("engine", ["llama.cpp", "ollama"])
def test_index_and_chain_on_a_real_engine(engine, index):
    """The whole pipeline against a served SmolLM2; the ollama engine is labkit's Ollama-compatible
    server here (``labkit.serve`` prefers a real Ollama when one is installed or running)."""
    import labkit
    questions = [q for q in rag.load_questions() if q["id"] in ("q01", "q12", "q47")]
    with labkit.serve(engine) as srv:
        llm = rag.chat_model(srv, max_tokens=24)
        expected = "ChatOllama" if engine == "ollama" else "ChatOpenAI"
        assert expected in [c.__name__ for c in type(llm).__mro__]
        capped = rag.chat_model(srv, max_tokens=5).invoke("Count from 1 to 100, one number per line.")
        assert 0 < capped.usage_metadata["output_tokens"] <= 5, capped.usage_metadata    # the cap reaches the engine
        pipe = rag.RAG(index.as_retriever(search_kwargs={"k": 2}), llm, count_tokens=rag.token_counter("smollm2"))
        out = pipe.invoke(questions[0]["question"])
        assert out["answer"].strip() and out["sources"][0] == "overview.md"
        rows = rag.evaluate_answers(pipe, questions, closed_book=rag.closed_book_chain(llm))
        assert not any(r["error"] for r in rows)
        assert all(r["rag_answer"] and r["closed_answer"] for r in rows)
        assert rows[0]["gold_retrieved"] and rows[1]["gold_retrieved"]
        assert all(r["generate_s"] > r["retrieve_s"] > 0 for r in rows)
        too_long = pipe.ask("Why? " * 3000)
        assert "QuestionTooLongError" in too_long.error
        assert pipe.ask(questions[0]["question"]).ok            # still serving after the bad question
