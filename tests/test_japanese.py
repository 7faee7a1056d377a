"""labkit.japanese: the Japanese corpus, tokenizer cost, sentence-aware splitting, BM25 with MeCab,
reciprocal rank fusion, prefixed embedders and Japanese answer scoring (chapter 05)."""
import os
from fractions import Fraction

import pytest

from labkit import japanese as ja
from labkit import rag
from labkit.errors import ModelNotFoundError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def docs():
    return ja.load_corpus().documents


@pytest.fixture(scope="module")
def questions():
    return ja.load_questions()


# --------------------------------------------------------------------------- data
def test_question_file_is_well_formed_and_answers_are_in_their_documents(docs, questions):
    texts = {d.metadata["doc_id"]: d.page_content for d in docs}
    ids = [q["id"] for q in questions]
    assert len(ids) == len(set(ids)) >= 20
    unanswerable = [q for q in questions if q["doc_id"] is None]
    assert len(unanswerable) >= 2 and all(q["answer"] is None for q in unanswerable)
    for q in questions:
        assert q["question"].endswith("？"), q["id"]
        if q["doc_id"] is not None:
            assert q["doc_id"] in texts, q
            assert q["answer"] in texts[q["doc_id"]], q          # the gold answer is verbatim in its document


def test_every_japanese_document_has_its_english_original_and_uses_japanese_sentence_ends(docs):
    pairs = ja.parallel_texts()
    assert len(pairs) == len(docs) >= 8
    for doc_id, ja_text, en_text in pairs:
        assert ja.japanese_share(ja_text) > 0.8 and ja.japanese_share(en_text) == 0, doc_id
        assert ja_text.rstrip().endswith("。"), doc_id


def test_parallel_texts_names_a_document_without_original(tmp_path):
    (tmp_path / "nowhere.md").write_text("どこにもない文書である。", encoding="utf-8")
    with pytest.raises(ValueError, match="nowhere"):
        ja.parallel_texts(tmp_path)


# --------------------------------------------------------------------------- tokenizers
def test_japanese_costs_more_tokens_per_character_than_english():
    tokenizers, skipped = ja.available_tokenizers(("smollm2", "minilm"))
    assert not skipped
    rows = {r["tokenizer"]: r for r in ja.tokenizer_table(ja.parallel_texts(), tokenizers)}
    smol = rows["smollm2"]
    assert smol["ja tokens/char"] / smol["en tokens/char"] > 1, smol
    assert smol["same content: ja/en tokens"] > 1, smol        # the same facts cost more tokens in Japanese
    # the English-only WordPiece vocabulary maps part of the Japanese text to [UNK], none of the English
    assert rows["minilm"]["ja [UNK] share"] > 0 and rows["minilm"]["en [UNK] share"] == 0


def test_token_counter_accepts_a_function_and_rejects_other_objects():
    assert ja.tokens_per_char(len, ["ab", "cd"]) == 1.0
    with pytest.raises(TypeError, match="Cannot count tokens"):
        ja.token_counter(42)
    with pytest.raises(ValueError, match="non-empty"):
        ja.tokens_per_char(len, ["", ""])


def test_a_missing_model_is_skipped_with_its_reason():
    found, skipped = ja.available_tokenizers(("no-such-model",))
    assert not found and "no-such-model" in skipped["no-such-model"]


# --------------------------------------------------------------------------- splitting
SENTENCES = ["島の北には古い灯台がある。", "灯台の光は七秒ごとに一回光る！", "それは本当だろうか？",
             "記録によれば、この灯台は二百年以上前に建てられ、五代にわたって同じ家が守ってきた。", "今は自動で動く。"]


def test_japanese_splitter_keeps_the_mark_and_never_cuts_a_sentence_shorter_than_a_chunk():
    text = "".join(SENTENCES)
    size = max(map(len, SENTENCES)) + 1
    chunks = ja.japanese_splitter(chunk_size=size, chunk_overlap=0).split_text(text)
    assert len(chunks) > 1
    assert all(c[-1] in "。！？" for c in chunks), chunks
    assert all(any(s in c for c in chunks) for s in SENTENCES)          # every sentence whole in one chunk
    assert "".join(chunks) == text


def test_default_separators_cut_japanese_mid_sentence_and_the_japanese_splitter_does_not(docs):
    default = rag.split_documents(docs, chunk_size=100)
    aware = ja.split_documents(docs, chunk_size=100)
    assert ja.mid_sentence_share(default, docs) > 0.2
    assert ja.mid_sentence_share(aware, docs) == 0
    assert {c.metadata["chunk"] for c in aware} == set(range(len(aware)))


def test_splitter_rejects_a_bad_overlap():
    with pytest.raises(ValueError, match="chunk_overlap"):
        ja.japanese_splitter(chunk_size=50, chunk_overlap=50)


# --------------------------------------------------------------------------- BM25, RRF, retriever
def test_ja_tokens_segments_words_and_drops_particles():
    assert ja.ja_tokens("ケルヴェイン諸島の首都はどこですか？") == ["ケルヴェイン", "諸島", "首都", "どこ"]
    assert ja.whitespace_tokens("ケルヴェイン諸島の首都はどこですか？") == ["ケルヴェイン諸島の首都はどこですか?"]


def test_bm25_with_fugashi_beats_bm25_with_whitespace_tokens(docs, questions):
    chunks = ja.split_documents(docs, chunk_size=200)
    gold = [q["doc_id"] for q in questions]
    recall = {}
    for name, tokenize in (("fugashi", ja.ja_tokens), ("whitespace", ja.whitespace_tokens)):
        index = ja.BM25Index(chunks, tokenize)
        rankings = [[d.metadata["doc_id"] for d, _ in index.search(q["question"], 3)] for q in questions]
        recall[name] = rag.recall_at_k(rankings, gold, 3)
    assert recall["fugashi"] >= recall["whitespace"] + 0.3, recall


def test_rrf_on_a_hand_made_example():
    fused = ja.rrf_fuse([["a", "b", "c"], ["c", "a", "d"]], k=0)
    # by hand, k=0: a = 1/1 + 1/2 = 1.5, c = 1/3 + 1/1 = 1.333…, b = 1/2, d = 1/3
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert Fraction(fused[0][1]).limit_denominator(100) == Fraction(3, 2)
    assert Fraction(fused[1][1]).limit_denominator(100) == Fraction(4, 3)
    fused60 = dict(ja.rrf_fuse([["x", "y"], ["y", "x"]], k=60))
    assert fused60["x"] == fused60["y"] == pytest.approx(1 / 61 + 1 / 62)
    assert ja.rrf_fuse([["x", "y"], ["y", "x"]])[0][0] == "x"          # a tie keeps first appearance
    with pytest.raises(ValueError):
        ja.rrf_fuse([["a"]], k=-1)


def test_retriever_modes_over_one_set_of_chunks(docs):
    from langchain_core.embeddings import DeterministicFakeEmbedding
    chunks = ja.split_documents(docs, chunk_size=200)
    retrievers = ja.build_retrievers(chunks, DeterministicFakeEmbedding(size=16), k=3, dense_name="fake")
    question = "ヘスカー岬の灯台は何秒ごとに光りますか？"
    got = {name: [d.metadata["doc_id"] for d in r.invoke(question)] for name, r in retrievers.items()}
    assert all(len(ids) == 3 for ids in got.values())
    assert got["BM25 (fugashi)"][0] == "lighthouse"
    assert "lighthouse" in got["hybrid RRF (fugashi BM25 + fake)"]
    bad = retrievers["BM25 (fugashi)"].model_copy(update={"mode": "magic"})
    with pytest.raises(ValueError, match="mode"):
        bad.invoke(question)


# --------------------------------------------------------------------------- embedders
class Recorder:
    """An inner embedder that records exactly what it was asked to embed."""

    def __init__(self):
        self.documents, self.queries = [], []

    def embed_documents(self, texts):
        self.documents += texts
        return [[float(len(t))] for t in texts]

    def embed_query(self, text):
        self.queries.append(text)
        return [float(len(text))]


def test_prefixed_embeddings_prefix_queries_and_passages_differently():
    card = ja.MULTILINGUAL_EMBEDDERS["cl-nagoya/ruri-v3-130m"]
    inner = Recorder()
    emb = ja.PrefixedEmbeddings(inner, card.query_prefix, card.passage_prefix)
    emb.embed_documents(["灯台は白い。", "風が強い。"])
    emb.embed_query("灯台の色は？")
    assert inner.documents == ["検索文書: 灯台は白い。", "検索文書: 風が強い。"]
    assert inner.queries == ["検索クエリ: 灯台の色は？"]
    e5 = ja.MULTILINGUAL_EMBEDDERS["intfloat/multilingual-e5-small"]
    assert (e5.query_prefix, e5.passage_prefix) == ("query: ", "passage: ")
    assert ja.MULTILINGUAL_EMBEDDERS["BAAI/bge-m3"].query_prefix == ""
    assert all(c.source.startswith("https://huggingface.co/" + c.name) for c in ja.MULTILINGUAL_EMBEDDERS.values())


def test_an_uncached_embedder_is_refused_with_the_reason_and_nothing_is_downloaded():
    name = "cl-nagoya/ruri-v3-310m"
    if ja.missing_reason(name) is None:
        pytest.skip(f"{name} is cached on this machine")
    assert "hf download" in ja.missing_reason(name)
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        ja.multilingual_embeddings(name)
    with pytest.raises(ValueError, match="Unknown embedder"):
        ja.missing_reason("someone/else")


# --------------------------------------------------------------------------- answers
def test_japanese_answer_scoring():
    q = {"doc_id": "parliament", "answer": "41", "aliases": ["四十一"]}
    assert ja.score(q, "議席は４１です。")                      # full-width digits fold to ASCII
    assert not ja.score(q, "141議席")
    assert not ja.score(q, "わかりません")
    assert ja.is_correct("ポート アンブレル", "ポート・アンブレル")
    assert ja.score({"doc_id": None, "answer": None}, "文脈には記載がありません。")
    assert ja.score({"doc_id": None, "answer": None}, "I don't know.")
    assert ja.japanese_share("カドウ山 (Mount Caddow)") == pytest.approx(4 / 15)

