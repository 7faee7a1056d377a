"""labkit.llamacpp: pure helpers on synthetic input, model-backed helpers on the bundled SmolLM2."""
import json
from types import SimpleNamespace as NS

import numpy as np
import pytest

from labkit import llamacpp_lab as lc


# ----------------------------------------------------------------------------- no model needed
def test_stream_interleaving_counts_switches():
    serial = [(0, 0.1), (0, 0.2), (0, 0.3), (1, 0.4), (1, 0.5)]
    batched = [(0, 0.1), (1, 0.15), (0, 0.2), (1, 0.25), (0, 0.3)]
    assert lc.stream_interleaving(serial) == 1
    assert lc.stream_interleaving(batched) == 4
    assert lc.stream_interleaving(list(reversed(serial))) == 1     # order comes from the times
    assert lc.stream_interleaving([]) == 0


def test_retrieval_scores():
    ids = ["a", "b", "c"]
    p = np.eye(3)
    q = np.array([[1, 0, 0], [0.1, 0.2, 1.0], [0, 1, 0.2]])
    s = lc.retrieval_scores(q, p, ids, ["a", "b", "c"])
    assert s["ranks"] == [1, 2, 2]
    assert s["recall@1"] == pytest.approx(1 / 3) and s["recall@3"] == 1.0
    assert s["MRR"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError):
        lc.retrieval_scores(q[:2], p, ids, ["a", "b", "c"])


def test_the_labelled_retrieval_set_is_well_formed():
    ids, passages, queries, relevant = lc.load_retrieval_set()
    assert len(ids) == len(set(ids)) == len(passages) >= 10
    assert len(queries) == len(relevant) >= 10 and set(relevant) <= set(ids)
    assert sorted(relevant) == sorted(ids)            # every passage is the answer to one query


def test_load_retrieval_set_rejects_unknown_labels(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passages": {"a": "x"}, "queries": [{"query": "q", "relevant": "zz"}]}))
    with pytest.raises(ValueError, match="unknown"):
        lc.load_retrieval_set(bad)


def test_validate_json():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert lc.validate_json('{"n": 3}', schema) == (True, "ok")
    ok, why = lc.validate_json('{"n": "three"}', schema)
    assert not ok and why.startswith("schema")
    ok, why = lc.validate_json("{n: 3", schema)
    assert not ok and why.startswith("not JSON")
    assert lc.validate_json("[1, 2]")[0]


def test_schema_gbnf_is_a_grammar():
    g = lc.schema_gbnf({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    assert g.splitlines()[0].startswith("root ::=") or "root ::=" in g
    assert '"true"' in g or "true" in g


def test_llama_server_command():
    cmd = lc.llama_server_command("m.gguf", n_ctx=4096, port=8081, n_gpu_layers=30, flash_attn="on")
    assert cmd.startswith("llama-server -m m.gguf --host 127.0.0.1 --port 8081 -c 4096")
    assert "-ngl 30" in cmd and "-fa on" in cmd and '--api-key "$LLAMA_API_KEY"' in cmd
    from labkit import repack
    assert ("--no-repack" in cmd) == (not repack.decide().enabled)     # the command a learner copies is safe here
    with pytest.raises(ValueError):
        lc.llama_server_command("m.gguf", flash_attn="1")
    with pytest.raises(ValueError, match="without an API key"):
        lc.llama_server_command("m.gguf", host="0.0.0.0", api_key_env=None)


def test_offloaded_layers():
    log = "load_tensors: loading model tensors\nload_tensors: offloaded 31/31 layers to GPU\n"
    assert lc.offloaded_layers(log) == (31, 31)
    with pytest.raises(LookupError):
        lc.offloaded_layers("load_tensors: CPU_Mapped model buffer size = 98 MiB")


def test_show_piece():
    assert lc.show_piece(b"cat") == "cat"
    assert lc.show_piece("東".encode()[:2]) == "<e6 9d>"


def test_render_chat_rejects_bad_messages():
    with pytest.raises(ValueError):
        lc.render_chat(lc.LLAMA3_STYLE, [{"content": "no role"}])


def test_chat_template_missing_is_explained():
    with pytest.raises(LookupError, match="chat_format"):
        lc.chat_template(NS(metadata={}))



def test_as_request_and_reply_text_for_chat_and_base_models():
    assert lc.as_request("Hi?", "{{ messages }}") == [{"role": "user", "content": "Hi?"}]
    assert lc.as_request("Hi?", None) == "Q: Hi?\nA:"                 # a base model gets text to continue
    assert lc.reply_text({"choices": [{"message": {"role": "assistant", "content": "chat"}}]}) == "chat"
    assert lc.reply_text({"choices": [{"text": "completion", "finish_reason": "stop"}]}) == "completion"
    assert lc.reply_text(NS(choices=[NS(message=NS(content="sdk chat"))])) == "sdk chat"
    assert lc.reply_text(NS(choices=[NS(text="sdk text")])) == "sdk text"


def test_server_create_picks_the_route_and_sends_json_mode_as_a_grammar():
    calls = []
    client = NS(chat=NS(completions=NS(create=lambda **kw: calls.append(("chat", kw)))),
                completions=NS(create=lambda **kw: calls.append(("completions", kw))))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    lc.server_create(client, "m", [{"role": "user", "content": "x"}], response_format={"type": "json_object"})
    lc.server_create(client, "m", "Q: x\nA:", response_format={"type": "json_object", "schema": schema})
    (route1, kw1), (route2, kw2) = calls
    assert route1 == "chat" and kw1["response_format"] == {"type": "json_object"}
    assert route2 == "completions" and kw2["prompt"] == "Q: x\nA:" and "response_format" not in kw2
    assert kw2["extra_body"]["grammar"] == lc.schema_gbnf(schema)

# ----------------------------------------------------------------------------- with the model
@pytest.fixture(scope="module")
def llm(smollm2_path):
    from llama_cpp import Llama
    m = Llama(model_path=str(smollm2_path), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    yield m
    m.close()


def test_rendered_template_is_what_the_model_sees(llm):
    msgs = [{"role": "user", "content": "Name a colour."}]
    prompt = lc.render_chat(lc.chat_template(llm), msgs, bos_token=lc.special_token(llm, "bos"),
                            eos_token=lc.special_token(llm, "eos"))
    assert "<|im_start|>user\nName a colour.<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    r = llm.create_chat_completion(messages=msgs, max_tokens=1, temperature=0.0)
    assert r["usage"]["prompt_tokens"] == len(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    wrong = lc.render_chat(lc.MISTRAL_STYLE, msgs)
    assert wrong.startswith("[INST] Name a colour. [/INST]")


def test_token_pieces_round_trip(llm):
    ja = "東京は日本の首都です。"
    pieces = lc.token_pieces(llm, ja)
    assert b"".join(p for _, p in pieces).decode() == ja
    assert len(pieces) > len(ja) // 2                          # several bytes per character
    assert any(lc.show_piece(p).startswith("<") for _, p in pieces)   # some pieces are partial characters
    assert [i for i, _ in lc.token_pieces(llm, "<|im_start|>", special=True)] == llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(lc.token_pieces(llm, "<|im_start|>", special=True)) == 1
    assert len(lc.token_pieces(llm, "<|im_start|>")) > 1      # as plain text it is just characters


def test_greedy_and_fixed_seed_are_reproducible(llm):
    msgs = [{"role": "user", "content": "Say something about cats."}]
    assert len(set(lc.greedy_runs(llm, msgs, n=2, max_tokens=12))) == 1
    rows = lc.sampling_table(llm, msgs, {"hot": {"temperature": 1.2}}, seeds=[1, 1, 2, 3, 4], max_tokens=12)
    replies = [r["reply"] for r in rows]
    assert replies[0] == replies[1]                              # same seed, same text
    assert len(set(replies[1:])) > 1                             # different seeds differ (4 draws at T=1.2)


def test_schema_grammar_constrains_output(llm):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12},
                                               "warm": {"type": "boolean"}}, "required": ["colour", "warm"]}
    r = llm.create_chat_completion(messages=[{"role": "user", "content": "Pick a colour."}], max_tokens=40,
                                   temperature=0.0, grammar=lc.schema_grammar(schema))
    assert lc.validate_json(r["choices"][0]["message"]["content"], schema) == (True, "ok")


def test_embed_needs_pooling(smollm2_path):
    import llama_cpp
    from llama_cpp import Llama
    none = Llama(model_path=str(smollm2_path), embedding=True, n_ctx=256, verbose=False)
    with pytest.raises(ValueError, match="pooling"):
        lc.embed(none, ["a"])
    none.close()
    mean = Llama(model_path=str(smollm2_path), embedding=True, n_ctx=256, verbose=False,
                 pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    v = lc.embed(mean, ["a cat", "a dog", "tax forms"])
    mean.close()
    assert v.shape == (3, 576) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def test_prefix_reuse_skips_the_prefix(llm):
    prefix = "Notes: " + "The lamp is lit at dusk and put out at dawn. " * 12
    rows = lc.prefix_reuse(llm, prefix, ["\nQ: When is the lamp lit?\nA:"], max_tokens=6)
    cold, warm = rows[0], rows[1]
    assert cold["mode"] == "cold" and warm["mode"] == "warm"
    assert cold["evaluated prompt tokens"] >= cold["prompt tokens"] - 1
    assert warm["evaluated prompt tokens"] < cold["prompt tokens"] // 4
    assert warm["reply"] == cold["reply"]


def test_prefix_reuse_refuses_a_prefix_that_fills_the_context(llm):
    with pytest.raises(ValueError, match="no room"):
        lc.prefix_reuse(llm, "word " * 2000, ["?"])


def test_lookup_decoding_keeps_greedy_text_on_a_copy_task(smollm2_path):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    kw = dict(model_path=str(smollm2_path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    plain, spec = Llama(**kw), Llama(**kw, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=8))
    text = "The keeper lit the lamp at dusk, wound the clock, and wrote the weather in the log."
    msgs = [{"role": "user", "content": "Repeat this sentence exactly:\n\n" + text}]
    res = lc.compare_lookup_decoding(plain, spec, msgs, max_tokens=30, repeats=1)
    plain.close(), spec.close()
    assert res["identical"], (res["plain text"], res["lookup text"])
    assert res["lookup forward passes"] < res["plain forward passes"] / 2   # drafts verified in batches
    assert res["speedup"] > 0 and res["lookup tokens evaluated"] >= res["completion tokens"] - 1


def test_load_measures_time_and_memory(smollm2_path):
    llm, cost = lc.load(smollm2_path, n_ctx=256, n_threads=1)
    llm.close()
    assert 0 < cost.seconds < 60 and cost.params == {"n_ctx": 256, "n_threads": 1}
    assert cost.rss_added_bytes > 10 * 2**20        # the weights became resident


def test_thread_sweep_validates():
    with pytest.raises(ValueError):
        lc.thread_sweep("unused.gguf", [])
    with pytest.raises(ValueError):
        lc.thread_sweep("unused.gguf", [0, 1])


def test_batch_efficiency(llm):
    e = lc.batch_efficiency(llm, k=8, repeats=2)
    assert e["k"] == 8 and e["single ms/token"] > 0 and e["batched ms/token"] > 0
    assert e["efficiency"] == pytest.approx(e["single ms/token"] / e["batched ms/token"])
    assert llm.n_tokens == 0


def test_count_evals_restores_the_method(llm):
    with lc._count_evals(llm) as calls:
        llm.eval(llm.tokenize(b"Hello there", add_bos=False))
        llm.eval([42])
    assert calls[0] == 2 and calls[1] == len(llm.tokenize(b"Hello there", add_bos=False)) + 1
    assert "eval" not in vars(llm)
    llm.reset()


# ----------------------------------------------------------------------------- a base model (no chat template)
@pytest.fixture(scope="module")
def base_llm():
    from llama_cpp import Llama

    from labkit import models
    try:
        path = models.get("gemma3", verify=False)
    except models.ModelNotFoundError:
        pytest.skip("gemma3 is not installed (make test-models installs it)")
    m = Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    yield m
    m.close()


def test_chat_prompt_is_what_a_chat_request_feeds_the_model(llm, base_llm):
    msgs = [{"role": "user", "content": "Name a colour."}]
    for model, template_in_file in ((llm, True), (base_llm, False)):
        r = model.create_chat_completion(messages=msgs, max_tokens=1, temperature=0.0)
        seen = model.input_ids[: r["usage"]["prompt_tokens"]].tolist()
        ours = model.tokenize(lc.chat_prompt(model, msgs).encode(), add_bos=False, special=True)
        assert seen in (ours, [model.token_bos()] + ours)
        assert (model.chat_format == "chat_template.default") == template_in_file
    assert lc.chat_prompt(base_llm, msgs).strip().endswith("[/INST]")      # llama-cpp-python's fallback: llama-2


def test_generate_on_a_base_model_uses_plain_completion_and_json_mode(base_llm):
    prompt = lc.as_request("Give facts about Paris as JSON.", None)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    r = lc.generate(base_llm, prompt, response_format={"type": "json_object", "schema": schema},
                    max_tokens=30, temperature=0.0)
    assert r["tokens"] > 0 and r["finish"] in ("stop", "length")
    if r["finish"] == "stop":
        assert lc.validate_json(r["text"], schema)[0], r
    plain = lc.generate(base_llm, prompt, max_tokens=8, temperature=0.0)
    assert plain["tokens"] > 0 and plain["text"] != r["text"]           # the grammar changed the output
    assert len(set(lc.greedy_runs(base_llm, prompt, n=2, max_tokens=8))) == 1


def test_old_module_name_still_imports_the_same_module():
    from labkit import llamacpp as old
    assert old is lc and old.timed_stream is lc.timed_stream
