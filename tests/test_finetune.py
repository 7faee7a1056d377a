"""labkit.finetune (chapter 10): the data split, the memory arithmetic against hand-checked numbers,
the cache key, bad adapters, and one real LoRA run through convert_lora_to_gguf.py and llama.cpp."""
import dataclasses
import json

import numpy as np
import pytest

from labkit import finetune as ft
from labkit.errors import AdapterMismatchError, CorruptModelError

H, INTER, L, V = 3584, 18944, 28, 152064          # Qwen2.5-7B config.json: hidden, intermediate, layers, vocab


# ----------------------------------------------------------------------------- memory arithmetic
def test_qwen25_7b_parameters_by_hand():
    # per block: q,o 3584x3584; k,v 3584x512; gate,up,down 3584x18944; q/k/v biases 3584+512+512; two norms
    block = 2 * H * H + 2 * H * 512 + 3 * H * INTER + (H + 512 + 512) + 2 * H
    assert block == 233_057_792
    total = L * block + 2 * V * H + H           # untied embeddings and output layer, final norm
    assert ft.QWEN25_7B.n_params == total == 7_615_616_512          # "7.61B" on the model card
    assert ft.QWEN25_7B.linear_params == L * (block - 2 * H)


def test_lora_parameter_count_by_hand():
    # r * (in + out) per adapted layer: q 3584+3584, k,v 3584+512, o 3584+3584, gate,up 3584+18944, down 18944+3584
    per_block = 7168 + 2 * 4096 + 7168 + 2 * 22528 + 22528
    assert ft.lora_parameter_count(ft.QWEN25_7B, 16) == 16 * per_block * L == 40_370_176
    assert ft.lora_parameter_count(ft.QWEN25_7B, 16, ("q_proj", "v_proj")) == 16 * (7168 + 4096) * L
    with pytest.raises(ValueError, match="c_attn"):
        ft.lora_parameter_count(ft.QWEN25_7B, 8, ("c_attn",))


def test_training_memory_components():
    full = ft.training_memory(ft.QWEN25_7B, "full", tokens=1, compute="bf16")
    n = ft.QWEN25_7B.n_params
    # AdamW in mixed precision: bf16 weights + fp32 master (6) + bf16 grads (2) + two fp32 states (8)
    assert full["weights"] + full["gradients"] + full["optimizer"] == 16 * n
    assert full["total"] > 80e9                 # the seed's "80 GB+" understates it
    lora = ft.training_memory(ft.QWEN25_7B, "lora", tokens=1, compute="bf16")
    p = 40_370_176
    assert lora["weights"] == 2 * n + 4 * p and lora["gradients"] == 4 * p and lora["optimizer"] == 8 * p
    qlora = ft.training_memory(ft.QWEN25_7B, "qlora", tokens=1, compute="bf16")
    lin = ft.QWEN25_7B.linear_params
    assert qlora["weights"] == pytest.approx(lin * 4.127 / 8 + (n - lin) * 2 + 4 * p)
    with pytest.raises(ValueError, match="method"):
        ft.training_memory(ft.QWEN25_7B, "dora", tokens=1)


def test_activation_bytes_by_hand():
    s = ft.QWEN25_7B
    # every linear layer trains, fp32: 9h + 4i values per token per block
    assert ft.activation_bytes(s, 10, compute="fp32") == 10 * L * (9 * H + 4 * INTER) * 4
    # q, v only: residuals 2h, the attention norm's output h, SDPA 4h, and the MLP's 3i (no down_proj input)
    assert ft.activation_bytes(s, 1, r=8, targets=("q_proj", "v_proj"), compute="bf16") == L * (7 * H + 3 * INTER + 16) * 2
    # checkpointing keeps each block's input and one block's activations
    assert ft.activation_bytes(s, 1, compute="fp32", checkpointing=True) == (L * H + 9 * H + 4 * INTER) * 4


def test_shape_from_a_real_config():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
               "model_type": "llama", "attention_bias": False}
    shape = ft.TransformerShape.from_config(smollm2, name="SmolLM2-135M")
    assert shape.n_params == 134_515_008           # what PEFT reports as the base's parameters
    assert ft.lora_parameter_count(shape, 8) == 2_442_240


def test_gemma3_shape_counts_its_extra_norms():
    """Gemma 3 270M (its config.json): a norm on each head's query and key and two more per block. The count
    equals transformers' own (268,098,176 parameters, summed over the model built on the meta device)."""
    gemma3 = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "tie_word_embeddings": True,
              "model_type": "gemma3_text"}
    shape = ft.TransformerShape.from_config(gemma3, name="Gemma 3 270M")
    assert shape.qk_norm and shape.sandwich_norms
    assert shape.n_params == 268_098_176
    plain = dataclasses.replace(shape, qk_norm=False, sandwich_norms=False)
    h, q, kv = 640, 4 * 256, 256
    # fp32: the four norms' inputs (4h) and the query and key before their norms (q + kv), per token per block
    assert ft.activation_bytes(shape, 1, compute="fp32") - ft.activation_bytes(plain, 1, compute="fp32") == 18 * (2 * h + q + kv) * 4


# ----------------------------------------------------------------------------- data
def test_committed_split_is_rebuilt_identically_and_does_not_leak(tmp_path):
    counts = ft.build_dataset(out_dir=tmp_path)
    for name in ("train.jsonl", "held_out.jsonl"):
        assert (tmp_path / name).read_bytes() == (ft.FINETUNE_DIR / name).read_bytes(), name
    train, held_out = ft.load_split()
    assert counts == {"train": len(train), "held_out": len(held_out)} and len(held_out) == 46
    users = {ft._norm(m["content"]) for r in train for m in r["messages"] if m["role"] == "user"}
    assert not any(ft._norm(ft.prompt(h["question"])) in users for h in held_out)
    assert {r["fact"] for r in train} == {h["id"] for h in held_out}      # every held-out fact is taught


def test_a_leaked_question_is_refused():
    train, held_out = ft.load_split()
    leak = [{"messages": [{"role": "user", "content": ft.prompt(held_out[3]["question"].upper())}]}]
    with pytest.raises(ft.DatasetError, match=held_out[3]["id"]):
        ft.check_split(train + leak, held_out)


def test_bad_facts_file_names_file_and_line(tmp_path):
    bad = tmp_path / "facts.jsonl"
    bad.write_text('{"id": "q47", "topic": "x", "questions": ["a"], "statement": "b"}\n')
    with pytest.raises(ft.DatasetError, match=r"facts.jsonl:1: .*q47"):
        ft.build_dataset(bad, out_dir=tmp_path)
    bad.write_text("{not json\n")
    with pytest.raises(ft.DatasetError, match=r"facts.jsonl:1"):
        ft.build_dataset(bad, out_dir=tmp_path)


# ----------------------------------------------------------------------------- cache key and adapters (tiny fakes)
def _safetensors(path, tensors):
    import torch
    from safetensors.torch import save_file
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    _safetensors(folder / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": (8, 6),
                                                "model.layers.0.self_attn.v_proj.weight": (4, 6)})
    return folder


def _adapter(folder, tensors, base_record=None):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    _safetensors(folder / "adapter_model.safetensors", tensors)
    if base_record:
        (folder / ft.BASE_RECORD).write_text(json.dumps(base_record))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_cache_key_follows_data_settings_and_base(tmp_path, base):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    key = ft.cache_key(ft.LoraSettings(), base, data)
    assert key == ft.cache_key(ft.LoraSettings(threads=3), base, data)            # threads do not change results
    assert key != ft.cache_key(ft.LoraSettings(r=8), base, data)
    assert key != ft.cache_key(ft.LoraSettings(targets=("v_proj", "q_proj")), base, data)
    assert ft.cache_key(ft.LoraSettings(targets=("v_proj", "q_proj")), base, data) == \
        ft.cache_key(ft.LoraSettings(targets=("q_proj", "v_proj")), base, data)   # order of targets does not matter
    data.write_text('{"messages": [1]}\n')
    assert key != ft.cache_key(ft.LoraSettings(), base, data)
    data.write_text('{"messages": []}\n')
    _safetensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": (8, 7)})
    assert key != ft.cache_key(ft.LoraSettings(), base, data)


def test_check_adapter_accepts_a_fitting_adapter(tmp_path, base):
    good = _adapter(tmp_path / "good", {f"{Q}.lora_A.weight": (2, 6), f"{Q}.lora_B.weight": (8, 2)},
                    {"model_type": "llama", "sha256": ft.base_digest(base)})
    assert ft.check_adapter(good, base) == {"r": 2, "alpha": 4, "n_matrices": 1, "targets": ["q_proj"]}


def test_adapter_for_another_base_names_file_and_shapes(tmp_path, base):
    wrong = _adapter(tmp_path / "wrong", {f"{Q}.lora_A.weight": (2, 10), f"{Q}.lora_B.weight": (12, 2)})
    with pytest.raises(AdapterMismatchError, match=r"adapter_model.safetensors does not fit .*q_proj is 6→8 .*2x10"):
        ft.check_adapter(wrong, base)


def test_adapter_trained_on_other_weights_is_refused_unless_not_strict(tmp_path, base):
    other = _adapter(tmp_path / "other", {f"{Q}.lora_A.weight": (2, 6), f"{Q}.lora_B.weight": (8, 2)},
                     {"model_type": "llama", "sha256": "0" * 64})
    with pytest.raises(AdapterMismatchError, match="trained on base weights 000000000000"):
        ft.check_adapter(other, base)
    assert ft.check_adapter(other, base, strict=False)["r"] == 2


def test_adapter_for_another_architecture(tmp_path, base):
    gpt2 = _adapter(tmp_path / "gpt2", {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (2, 6),
                                        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (18, 2)})
    with pytest.raises(AdapterMismatchError, match=r"transformer\.h\.0\.attn\.c_attn.*LlamaForCausalLM.*another architecture"):
        ft.check_adapter(gpt2, base)
    recorded = _adapter(tmp_path / "rec", {f"{Q}.lora_A.weight": (2, 6), f"{Q}.lora_B.weight": (8, 2)},
                        {"model_type": "gemma3"})
    with pytest.raises(AdapterMismatchError, match="gemma3 model, but .* is llama"):
        ft.check_adapter(recorded, base)


def test_corrupt_adapter_files(tmp_path, base):
    folder = _adapter(tmp_path / "a", {f"{Q}.lora_A.weight": (2, 6), f"{Q}.lora_B.weight": (8, 2)})
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-20])
    with pytest.raises(CorruptModelError, match="adapter_model.safetensors is truncated"):
        ft.check_adapter(folder, base)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptModelError, match="not a readable safetensors file"):
        ft.check_adapter(folder, base)
    weights.write_bytes(data)
    (folder / "adapter_config.json").write_text("{oops")
    with pytest.raises(CorruptModelError, match="adapter_config.json is not valid JSON"):
        ft.check_adapter(folder, base)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CorruptModelError, match="adapter_config.json is missing"):
        ft.check_adapter(folder, base)
    half = _adapter(tmp_path / "half", {f"{Q}.lora_A.weight": (2, 6)})
    with pytest.raises(CorruptModelError, match="has only lora_A"):
        ft.check_adapter(half, base)


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="precision"):
        ft.LoraSettings(precision="fp8")
    with pytest.raises(ValueError, match="positive"):
        ft.LoraSettings(r=0)


def test_base_model_gets_one_chat_format_in_transformers_and_llama_cpp(tmp_path):
    """A tokenizer without a chat template (a base model) gets PLAIN_CHAT_TEMPLATE: the answer is learned up to
    and including EOS, and llama.cpp, given the same template, feeds the model exactly the tokens trained on."""
    import shutil

    from transformers import AutoTokenizer

    from labkit import llamacpp_lab, models
    folder = models.hf_folder("smollm2", dtype="float32")
    shutil.copy(folder / "tokenizer.json", tmp_path)         # not chat_template.jinja: no template
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert not tokenizer.chat_template
    tokenizer = ft.with_chat_format(tokenizer)
    row = ft.load_split()[0][0]
    ids, labels = ft.encode(tokenizer, row)
    learned = [t for t in labels if t != -100]
    assert learned[-1] == tokenizer.eos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned[:-1]) == " " + row["messages"][-1]["content"]
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    assert prompt == tokenizer.bos_token + ft.SYSTEM + "\n\n" + row["messages"][1]["content"]

    llm, _ = llamacpp_lab.load(models.get("smollm2"), n_ctx=256)
    assert llamacpp_lab.render_chat(ft.PLAIN_CHAT_TEMPLATE, row["messages"][:-1], bos_token=llamacpp_lab.special_token(llm, "bos"),
                                eos_token=llamacpp_lab.special_token(llm, "eos")) == prompt
    llamacpp_lab.use_chat_template(llm, ft.PLAIN_CHAT_TEMPLATE)
    usage = llm.create_chat_completion(messages=row["messages"][:-1], max_tokens=1, temperature=0)["usage"]
    assert usage["prompt_tokens"] == len(ids) - len(learned)


# ----------------------------------------------------------------------------- end to end, real engines
@pytest.mark.full      # chapter 10 trains, converts and applies an adapter in make test; this is its second run
def test_tiny_lora_trains_and_round_trips_through_llama_cpp(tmp_path):
    """A few real steps on SmolLM2: the loss falls; the adapter converts to GGUF, llama.cpp applies it
    (the next-token logits change) and leaves the base alone without it."""
    from labkit import llamacpp_lab, models
    base_folder = models.hf_folder("smollm2", dtype="float32")
    train, _ = ft.load_split()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train[:8]))
    settings = ft.LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj"), lr=3e-3, epochs=4, batch_size=4)
    metrics = ft.train(settings, base_folder, tmp_path / "adapter", data)
    losses = metrics["losses"]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]) * 0.8, losses
    assert metrics["trainable_params"] == ft.lora_parameter_count(ft.TransformerShape.from_config(base_folder), 4, ("q_proj", "v_proj"))
    ft.check_adapter(tmp_path / "adapter", base_folder)
    # seeded: the same first steps again, bit for bit (same initial A, same batch order, same first update)
    again = ft.train(ft.LoraSettings(**{**settings.__dict__, "epochs": 1}), base_folder, tmp_path / "again", data)
    assert again["losses"] == losses[:2]

    gguf_adapter = ft.adapter_to_gguf(tmp_path / "adapter", base_folder, tmp_path / "adapter.gguf")
    from labkit import gguf
    if hasattr(gguf, "check_lora_adapter"):
        assert gguf.check_lora_adapter(gguf_adapter, models.get("smollm2"))["rank"] == 4

    llm, _ = llamacpp_lab.load(models.get("smollm2"), n_ctx=256)
    tokens = llm.tokenize(b"Question: How many pins make one kelvane mark?\nShort answer:")

    def next_logits(**params):
        # llamacpp_lab.all_logits loads with logits_all=True: without it llama-cpp-python keeps no logits
        # in .scores (they stay zero), and every comparison of them would be equal
        return llamacpp_lab.all_logits(models.get("smollm2"), tokens, n_ctx=256, **params)[-1]

    plain, tuned, plain_again = next_logits(), next_logits(lora_path=str(gguf_adapter)), next_logits()
    assert np.abs(tuned - plain).max() > 1e-2
    assert np.array_equal(plain, plain_again)
