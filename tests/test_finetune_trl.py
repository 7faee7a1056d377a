"""labkit.finetune's second trainer (chapter 10): TRL's SFTTrainer on the same rows and settings as train_loop,
the labels both put the loss on, the precision chosen from measured step times, and Unsloth's recipe in PEFT's terms."""
import pytest

from labkit import finetune as ft


def _row(answer="40", rid="q01-p0"):
    return {"id": rid, "messages": [*ft.messages("How many pins?"), {"role": "assistant", "content": answer}]}


# ----------------------------------------------------------------------------- data for TRL
def test_prompt_completion_splits_off_the_answer():
    [ex] = ft.prompt_completion([_row()])
    assert [m["role"] for m in ex["prompt"]] == ["system", "user"]
    assert ex["completion"] == [{"role": "assistant", "content": "40"}]


def test_prompt_completion_refuses_a_row_not_ending_with_the_answer():
    row = _row()
    row["messages"] = row["messages"][:-1]
    with pytest.raises(ft.DatasetError, match="q01-p0.*assistant"):
        ft.prompt_completion([row])


def test_compare_labels_same_and_extra_tokens_after_ours():
    ours = [([1, 2, 3, 9], [-100, -100, 3, 9]), ([1, 5, 9], [-100, 5, 9])]
    theirs = [([1, 2, 3, 9, 7], [-100, -100, 3, 9, 7]), ([1, 5, 9, 7], [-100, 5, 9, 7])]
    out = ft.compare_labels(ours, theirs)
    assert out == {"rows": 2, "same_inputs": True, "rows_learning_otherwise": [], "extra_learned": {7: 2}}


def test_compare_labels_finds_a_prompt_token_learned_and_other_inputs():
    ours = [([1, 2, 3, 9], [-100, -100, 3, 9])]
    assert ft.compare_labels(ours, [([1, 2, 3, 9], [-100, 2, 3, 9])])["rows_learning_otherwise"] == [0]   # a prompt token
    assert ft.compare_labels(ours, [([1, 2, 3, 9], [-100, -100, -100, 9])])["rows_learning_otherwise"] == [0]
    assert not ft.compare_labels(ours, [([1, 4, 3, 9], [-100, -100, 3, 9])])["same_inputs"]
    with pytest.raises(ValueError, match="same rows"):
        ft.compare_labels(ours, [])


# ----------------------------------------------------------------------------- the run and its cache key
def test_trl_run_has_its_own_cache_key_and_the_loop_keeps_its_own(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    s = ft.LoraSettings()
    assert ft.cache_key(s, base, data) == ft.cache_key(s, base, data, "loop")
    assert ft.cache_key(s, base, data, "trl") != ft.cache_key(s, base, data)
    with pytest.raises(ValueError, match="trainer"):
        ft.train_cached(s, base, data, trainer="unsloth")
    with pytest.raises(ValueError, match="trainer"):
        ft.train(s, base, tmp_path / "out", data, trainer="keras")


def test_sft_config_is_the_loops_optimisation():
    s = ft.LoraSettings(lr=1e-3, epochs=2, batch_size=4, seed=7, precision="bf16")
    c = ft.sft_config(s, "/tmp/unused")
    assert (c.learning_rate, c.num_train_epochs, c.per_device_train_batch_size, c.seed) == (1e-3, 2, 4, 7)
    assert c.max_grad_norm == 0 and c.weight_decay == 0 and c.warmup_steps == 0 and not c.gradient_checkpointing
    assert c.lr_scheduler_type.value == "linear" and c.optim.value == "adamw_torch" and c.bf16 and c.use_cpu
    assert not ft.sft_config(ft.LoraSettings(precision="fp32"), "/tmp/unused").bf16


@pytest.mark.engine      # loads SmolLM2's weights (no training): what TRL's dataset preparation makes of the rows
def test_sft_trainer_learns_the_same_answer_tokens_as_encode(tmp_path):
    """TRL's prompt-completion masking learns exactly encode's tokens, plus what ChatML renders after <|im_end|>."""
    from labkit import models
    folder = models.hf_folder("smollm2", dtype="float32")
    model, tokenizer = ft.load_base(folder)
    rows = ft.load_split()[0][:6]
    trainer = ft.sft_trainer(ft.LoraSettings(r=2, alpha=4, targets=("q_proj",)), model, tokenizer, rows, tmp_path)
    theirs = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    out = ft.compare_labels([ft.encode(tokenizer, r) for r in rows], theirs)
    assert out["same_inputs"] and out["rows_learning_otherwise"] == []
    assert out["extra_learned"] == {tokenizer.convert_tokens_to_ids("\n") if "\n" in tokenizer.get_vocab()
                                    else tokenizer.encode("\n", add_special_tokens=False)[0]: 6}


# ----------------------------------------------------------------------------- precision, from measurements
def test_choose_precision_takes_bf16_only_when_it_pays():
    assert ft.choose_precision({"fp32": 3.0, "bf16": 2.0}) == "bf16"
    assert ft.choose_precision({"fp32": 3.0, "bf16": 2.9}) == "fp32"           # 3% is noise, not worth rounding
    assert ft.choose_precision({"fp32": 3.0, "bf16": 4.0}) == "fp32"           # emulated bf16: slower
    assert ft.choose_precision({"fp32": 3.0}) == "fp32"
    assert ft.choose_precision({"fp32": 3.0, "bf16": 2.9}, min_speedup=1.0) == "bf16"
    with pytest.raises(ValueError, match="fp32"):
        ft.choose_precision({"bf16": 1.0})
    with pytest.raises(ValueError, match="positive"):
        ft.choose_precision({"fp32": 0.0, "bf16": 1.0})


def test_time_step_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="fp16"):
        ft.time_step(None, {}, "fp16")


# ----------------------------------------------------------------------------- Unsloth's recipe
def test_unsloth_recipe_maps_onto_peft_and_bitsandbytes():
    base = ft.LoraSettings(r=8, alpha=32, lr=1e-3, epochs=2, precision="bf16")
    settings, bnb = ft.unsloth_to_peft(ft.UNSLOTH_RECIPE, base)
    assert (settings.r, settings.alpha, settings.dropout) == (16, 16, 0.0)
    assert settings.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (settings.lr, settings.epochs) == (1e-3, 2)                        # what the recipe leaves to the run
    assert bnb == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                   "bnb_4bit_compute_dtype": "bfloat16"}
    _, bnb32 = ft.unsloth_to_peft(ft.UNSLOTH_RECIPE, ft.LoraSettings(precision="fp32"))
    assert bnb32["bnb_4bit_compute_dtype"] == "float32"
    assert ft.unsloth_to_peft({**ft.UNSLOTH_RECIPE, "load_in_4bit": False}, base)[1] == {}
    with pytest.raises(ValueError, match="c_attn"):
        ft.unsloth_to_peft({**ft.UNSLOTH_RECIPE, "target_modules": ["c_attn"]}, base)
