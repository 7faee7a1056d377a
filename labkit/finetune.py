"""Fine-tuning on a laptop CPU: LoRA with PEFT, shipped as GGUF (introduced in chapter 10).

The chapter teaches SmolLM2-135M-Instruct the invented facts of chapter 05's Kelvane Islands and
then ships the result to the engines of chapters 02–04. The pieces, in the chapter's order:

* **data** — :func:`build_dataset` turns ``data/finetune/facts.jsonl`` (hand-written paraphrases
  and statements, one line per fact of ``data/rag/questions.jsonl``) into ``train.jsonl`` and
  ``held_out.jsonl``; the held-out questions are chapter 05's original wording, never trained on
  (:func:`check_split`).
* **LoRA** — :class:`LoraSettings` (rank r, alpha, target modules, learning rate, epochs...),
  :func:`lora_parameter_count` (trainable parameters from the model's own shapes),
  :func:`train_loop` (the plain PyTorch loop the chapter shows), :func:`train` (one run in this
  process) and :func:`train_cached` (a run in a child process, to measure its peak memory, cached
  under ``cache_dir()/finetune/<key>``, the key a hash of data + settings + base weights).
* **TRL** — the same run with TRL's ``SFTTrainer`` (``train(..., trainer="trl")``): :func:`prompt_completion`
  (conversational prompt-completion rows: loss on the answer only), :func:`sft_config` (the loop's
  optimisation in ``SFTConfig``'s terms), :func:`sft_trainer`, and :func:`compare_labels` (what each learns).
* **precision** — :func:`time_step` and :func:`choose_precision`: bf16 autocast only where it measures faster.
* **Unsloth** — :data:`UNSLOTH_RECIPE` (the source documents' example) and :func:`unsloth_to_peft`: the same
  settings with PEFT and transformers' ``BitsAndBytesConfig``.
* **memory** — :func:`training_memory`: weights, gradients, AdamW's two fp32 states,
  activations (:func:`activation_bytes`) and logits for full fine-tuning, LoRA and QLoRA, from a
  model's config (:class:`TransformerShape`, :data:`QWEN25_7B`); :func:`saved_tensor_bytes`
  measures what autograd really keeps, to check the activation term.
* **evaluation** — :func:`generate_answers` (greedy, batched) and :func:`accuracy`, scored with
  chapter 05's :func:`labkit.rag.score`.
* **shipping** — :func:`load_with_adapter`, :func:`merge_adapter` (``merge_and_unload`` → an HF folder for
  ``convert_hf_to_gguf.py``) and :func:`adapter_to_gguf` (``convert_lora_to_gguf.py``).
* **bad input** — :func:`check_adapter`: an adapter folder for another base model, another
  architecture, or a corrupt weights file is refused with the file and the mismatch named.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .env import DATA_DIR, cache_dir, sha256
from .errors import AdapterMismatchError, CorruptModelError, LabkitError

FINETUNE_DIR = DATA_DIR / "finetune"
FACTS_PATH = FINETUNE_DIR / "facts.jsonl"
TRAIN_PATH = FINETUNE_DIR / "train.jsonl"
HELD_OUT_PATH = FINETUNE_DIR / "held_out.jsonl"
QUESTIONS_PATH = DATA_DIR / "rag" / "questions.jsonl"
# The same instruction as chapter 05's closed-book baseline (labkit.rag.CLOSED_BOOK_SYSTEM), so the
# numbers before and after training compare with chapter 05's.
SYSTEM = "Answer the question with a short answer of a few words."
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A chat format for a base model that has none (Gemma 3 270M, chapter 10's second test model): plain text around
# the model's own BOS and EOS, no new tokens, so the adapter still fits the base GGUF. TRL's setup_chat_format does
# the same job with ChatML and added tokens (which resizes the embeddings). The answer follows "Short answer:"
# after a space and ends with EOS, where generation stops.
PLAIN_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                       "{% elif m['role'] == 'user' %}{{ m['content'] }}"
                       "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
# The same prompt in Ollama's Go template language, for a Modelfile TEMPLATE (Ollama adds the BOS itself and stops at
# EOS); a real Ollama cannot translate an unknown Jinja template, so a Modelfile must say it.
PLAIN_OLLAMA_TEMPLATE = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"


class DatasetError(LabkitError, ValueError):
    """A fine-tuning data file that is malformed, or a split that leaks held-out questions."""


# ----------------------------------------------------------------------------- data
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """One JSON object per non-empty line; an error naming the file and line otherwise."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    return rows


def prompt(question: str) -> str:
    """The user turn for a question, worded as chapter 05's closed-book prompt."""
    return f"Question: {question}\nShort answer:"


def messages(question: str) -> list[dict]:
    """Chat messages asking ``question`` closed-book (system instruction + user turn)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt(question)}]


def build_dataset(facts_path=FACTS_PATH, questions_path=QUESTIONS_PATH, out_dir=FINETUNE_DIR) -> dict[str, int]:
    """Write ``train.jsonl`` and ``held_out.jsonl`` from the facts file; deterministic (no randomness).

    Training rows: for every fact, each paraphrased question with the short gold answer, and
    "Tell me about TOPIC." with the fact as a sentence. Held-out rows: chapter 05's original
    question with its answer and aliases — the wording training never shows.
    """
    questions = {q["id"]: q for q in read_jsonl(questions_path)}
    train, held_out = [], []
    for n, fact in enumerate(read_jsonl(facts_path), 1):
        q = questions.get(fact.get("id"))
        if q is None or q.get("doc_id") is None:
            raise DatasetError(f"{facts_path}:{n}: id {fact.get('id')!r} is not an answerable question of {questions_path}")
        for i, para in enumerate(fact["questions"]):
            train.append({"id": f"{q['id']}-p{i}", "fact": q["id"], "messages": [
                *messages(para), {"role": "assistant", "content": q["answer"]}]})
        train.append({"id": f"{q['id']}-s", "fact": q["id"], "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {fact['topic']}."},
            {"role": "assistant", "content": fact["statement"]}]})
        held_out.append({"id": q["id"], "question": q["question"], "doc_id": q["doc_id"], "answer": q["answer"],
                         "aliases": q.get("aliases", [])})
    check_split(train, held_out)
    out_dir = Path(out_dir)
    for name, rows in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        (out_dir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"train": len(train), "held_out": len(held_out)}


def _norm(text: str) -> str:
    from .rag import normalize
    return normalize(text)


def check_split(train: Sequence[dict], held_out: Sequence[dict]) -> None:
    """Refuse a split in which a held-out question appears (normalised) as a training user turn."""
    seen = {_norm(m["content"]) for row in train for m in row["messages"] if m["role"] == "user"}
    leaked = [h["id"] for h in held_out if _norm(prompt(h["question"])) in seen or _norm(h["question"]) in seen]
    if leaked:
        raise DatasetError(f"held-out question(s) {', '.join(leaked)} also appear in the training data: "
                           "reword them in data/finetune/facts.jsonl, then rebuild with build_dataset()")


def load_split(train_path=TRAIN_PATH, held_out_path=HELD_OUT_PATH) -> tuple[list[dict], list[dict]]:
    """The committed split, checked."""
    train, held_out = read_jsonl(train_path), read_jsonl(held_out_path)
    check_split(train, held_out)
    return train, held_out


# ----------------------------------------------------------------------------- tokens
def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat example: labels are -100 (ignored) everywhere except on the
    assistant's answer and its end-of-turn token, so the loss teaches answers, not prompts."""
    msgs = row["messages"]
    prompt_ids = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise DatasetError(f"example {row.get('id')}: the chat template renders the prompt differently with and "
                           "without the answer, so the answer tokens cannot be located")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    return answer_labels(prompt_ids, full_ids, end)


def answer_labels(prompt_ids, full_ids, end_id) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one chat example, as chapter 10 trains: the prompt's positions are
    -100 (no loss), the answer is learned up to and including its first end-of-turn token, and
    whatever the template puts after that token (a newline) is cut off."""
    n = len(prompt_ids)
    stop = next((i for i in range(n, len(full_ids)) if full_ids[i] == end_id), len(full_ids) - 1)
    return list(full_ids[:stop + 1]), [-100] * n + list(full_ids[n:stop + 1])


def make_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int, epoch: int):
    """Shuffled (seed, epoch) batches, right-padded to their longest example: dicts of tensors."""
    import random

    import torch
    order = list(range(len(encoded)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        part = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        labels = torch.full((len(part), width), -100, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, (x, y) in enumerate(part):
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_sizes(encoded, settings, pad_id: int) -> list[tuple[int, int]]:
    """(tokens incl. padding, answer tokens scored) of every step of a run, in order."""
    return [(b["input_ids"].numel(), int((b["labels"][:, 1:] != -100).sum()))
            for epoch in range(settings.epochs)
            for b in make_batches(encoded, settings.batch_size, pad_id, settings.seed, epoch)]


# ----------------------------------------------------------------------------- LoRA
@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA run is: everything here goes into the cache key."""
    r: int = 16                         # rank of the update B·A
    alpha: int = 32                     # the update is scaled by alpha / r
    targets: tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.0
    lr: float = 2e-3
    epochs: int = 3
    batch_size: int = 16
    seed: int = 0
    precision: str = "fp32"             # "fp32", or "bf16" (autocast: bf16 matmuls, fp32 weights and adapter)
    threads: int = 0                    # torch threads; 0: torch's default. Not part of the result.

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {self.precision!r}")
        if self.r < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("r, epochs and batch_size must be positive")

    def key_fields(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("threads")
        out["targets"] = sorted(self.targets)
        return out


def peft_config(settings: LoraSettings):
    from peft import LoraConfig
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")


def bf16_native() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX, oneDNN's test)."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def with_chat_format(tokenizer):
    """``tokenizer``, given :data:`PLAIN_CHAT_TEMPLATE` if it has no chat template of its own (a base model)."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def load_base(folder: str | os.PathLike, dtype: str = "float32"):
    """(model, tokenizer) of an HF folder, SDPA attention, in ``dtype``, ready for training or generation.
    A tokenizer without a chat template (a base model) gets :data:`PLAIN_CHAT_TEMPLATE`, so that training,
    evaluation and the merged model (which saves it) all use one format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = with_chat_format(AutoTokenizer.from_pretrained(str(folder)))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model, tokenizer


def answer_loss(model, batch: dict):
    """Mean cross-entropy on the answer tokens only. The output layer (576 → 49,152 for SmolLM2) is
    applied to those positions alone: most of a batch is prompt, and its logits would cost more
    arithmetic and memory than the rest of the loss."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]                 # position t predicts token t + 1
    keep = targets != -100
    logits = base.lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def train_loop(model, encoded, settings: LoraSettings, pad_id: int, on_step=None) -> list[float]:
    """The training loop: AdamW on the parameters that require gradients (the adapter), learning
    rate decaying linearly to 0, one loss value per step."""
    import torch
    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(encoded) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    device = next(model.parameters()).device        # CPU here; a GPU for QLoRA
    model.train()
    losses = []
    for epoch in range(settings.epochs):
        for batch in make_batches(encoded, settings.batch_size, pad_id, settings.seed, epoch):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
                loss = answer_loss(model, batch)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step:
                on_step(len(losses), total, losses[-1])
    model.eval()
    return losses


# ----------------------------------------------------------------------------- TRL's SFTTrainer, the same run
def prompt_completion(rows: Sequence[dict]) -> list[dict]:
    """Chat rows as TRL's conversational *prompt-completion* examples: the prompt is every message but the
    last, the completion the assistant's answer. For this format SFTTrainer's default ``completion_only_loss``
    puts the loss on the completion's tokens only — the assistant-only loss :func:`encode` builds by hand."""
    out = []
    for row in rows:
        msgs = row["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DatasetError(f"example {row.get('id')}: the last message must be the assistant's answer")
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return out


def sft_config(settings: LoraSettings, output_dir):
    """TRL's ``SFTConfig`` for the same run as :func:`train_loop`: AdamW (torch's), no weight decay, no gradient
    clipping, learning rate decaying linearly to 0 with no warm-up, the same batch size, epochs and seed, bf16
    autocast or fp32 as ``settings.precision`` says, on the CPU. TRL's own defaults differ where noted."""
    from trl import SFTConfig
    return SFTConfig(
        output_dir=str(output_dir), learning_rate=settings.lr, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, seed=settings.seed,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch",                 # default: the fused AdamW; same update, other kernel
        max_grad_norm=0.0,                   # default 1.0 clips the gradient; train_loop does not
        bf16=settings.precision == "bf16",   # default: bf16 whenever fp16 is off
        activation_checkpointing=False,      # TRL's default (gradient_checkpointing=True) recomputes: slower, less memory
        use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)


def sft_trainer(settings: LoraSettings, model, tokenizer, rows: Sequence[dict], output_dir):
    """TRL's ``SFTTrainer`` on ``rows`` (:func:`prompt_completion`), with :func:`peft_config`'s LoRA: it wraps the
    model with PEFT itself, after seeding torch with ``settings.seed`` — the same initial adapter as :func:`train`."""
    from datasets import Dataset
    from trl import SFTTrainer
    return SFTTrainer(model=model, args=sft_config(settings, output_dir), processing_class=tokenizer,
                      train_dataset=Dataset.from_list(prompt_completion(rows)), peft_config=peft_config(settings))


def compare_labels(ours: Sequence[tuple[list[int], list[int]]], theirs: Sequence[tuple[list[int], list[int]]]) -> dict:
    """Compare two encodings of the same rows, (input ids, labels) each: whether every row starts with the
    same ids, the rows whose *learned* tokens (labels not -100) differ beyond tokens the other adds after
    ``ours`` ends, and those extra learned tokens, counted by id."""
    from collections import Counter
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} rows against {len(theirs)}: compare encodings of the same rows")
    same_prefix, differ, extra = True, [], Counter()
    for i, ((x, y), (tx, ty)) in enumerate(zip(ours, theirs)):
        same_prefix &= list(tx[:len(x)]) == list(x)
        learned = [t for t in y if t != -100]
        their_learned = [t for t in ty[:len(x)] if t != -100]
        if learned != their_learned:
            differ.append(i)
        extra.update(t for t in ty[len(x):] if t != -100)
    return {"rows": len(ours), "same_inputs": same_prefix, "rows_learning_otherwise": differ, "extra_learned": dict(extra)}


# ----------------------------------------------------------------------------- precision, measured
def time_step(model, batch: dict, precision: str) -> float:
    """Seconds of one forward + backward of :func:`answer_loss` on ``batch`` in ``precision`` ("fp32", or "bf16":
    autocast on the batch's device); the gradients are cleared afterwards."""
    import torch
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    device = batch["input_ids"].device
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = answer_loss(model, batch)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def choose_precision(step_s: dict[str, float], min_speedup: float = 1.25) -> str:
    """The precision to train in, from measured step times (:func:`time_step`): bf16 only when it is at
    least ``min_speedup`` times as fast as fp32 — it rounds every matrix product, so it must pay for itself, and
    a margin well above one step's timing noise keeps the choice (part of the cache key) from flipping between runs."""
    if "fp32" not in step_s:
        raise ValueError("measure fp32 too: bf16 is chosen only against it")
    if any(not v > 0 for v in step_s.values()):
        raise ValueError(f"step times must be positive seconds, not {step_s}")
    return "bf16" if "bf16" in step_s and step_s["fp32"] / step_s["bf16"] >= min_speedup else "fp32"


# ----------------------------------------------------------------------------- Unsloth's recipe in PEFT's terms
# The source documents' recommended QLoRA tool and its example (FastLanguageModel.from_pretrained +
# FastLanguageModel.get_peft_model). Unsloth 2026.10's own defaults where the example is silent: NF4 with double
# quantization, compute in bf16 where the GPU has it, else fp16; gradient checkpointing "unsloth" (offloaded).
UNSLOTH_RECIPE = {"model_name": "unsloth/llama-3-8b-bnb-4bit", "max_seq_length": 2048, "load_in_4bit": True,
                  "r": 16, "lora_alpha": 16, "lora_dropout": 0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def unsloth_to_peft(recipe: dict, base: LoraSettings) -> tuple[LoraSettings, dict]:
    """(LoraSettings, BitsAndBytesConfig keyword arguments) doing what an Unsloth recipe does with PEFT and
    transformers alone; ``base`` gives what the recipe does not set (learning rate, epochs, batch, seed, precision).
    The compute dtype follows ``base.precision`` (bf16, or fp32 where bf16 did not pay off)."""
    unknown = set(recipe["target_modules"]) - set(ALL_LINEAR)
    if unknown:
        raise ValueError(f"target module(s) {sorted(unknown)} are not among {', '.join(ALL_LINEAR)}")
    settings = dataclasses.replace(base, r=recipe["r"], alpha=recipe["lora_alpha"], dropout=float(recipe["lora_dropout"]),
                                   targets=tuple(recipe["target_modules"]))
    bnb = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16" if base.precision == "bf16" else "float32"}
           if recipe.get("load_in_4bit") else {})
    return settings, bnb


# ----------------------------------------------------------------------------- evaluation
def generate_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 16,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to closed-book questions, in batches (left padding, so every prompt ends
    where generation starts)."""
    import torch
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    model.eval()
    for start in range(0, len(questions), batch_size):
        texts = [tokenizer.apply_chat_template(messages(q), add_generation_prompt=True, tokenize=False)
                 for q in questions[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def accuracy(held_out: Sequence[dict], answers: Sequence[str]) -> float:
    """Share of questions answered correctly (chapter 05's :func:`labkit.rag.score`: the gold
    answer or an alias appears as whole words, case-insensitive, and the reply is no refusal)."""
    from .rag import score
    if len(held_out) != len(answers):
        raise ValueError(f"{len(held_out)} questions but {len(answers)} answers")
    return sum(score(q, a) for q, a in zip(held_out, answers)) / len(held_out) if held_out else float("nan")


# ----------------------------------------------------------------------------- one run, cached
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_RECORD = "labkit_base.json"        # what the adapter was trained on: architecture, shapes' source, digest


def base_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of an HF folder's weights (all ``*.safetensors`` files, in name order)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights: pass an HF model folder (labkit.models.hf_folder)")
    return hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()


def cache_key(settings: LoraSettings, base_folder, train_path=TRAIN_PATH, trainer: str = "loop") -> str:
    """16 hex digits that change with the training data, the settings, the base model's weights or the trainer."""
    from .models import chat_template
    blob = json.dumps({"data": sha256(train_path), "settings": settings.key_fields(), "base": base_digest(base_folder),
                       "format": 2, **({} if chat_template(base_folder) else {"template": PLAIN_CHAT_TEMPLATE}),
                       **({} if trainer == "loop" else _trl_recipe())},      # the loop's keys stay as they were
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _trl_recipe() -> dict:
    """What a TRL run depends on beyond data, settings and base: TRL's version and labkit's code that sets it up."""
    import inspect
    from importlib.metadata import version
    code = "".join(inspect.getsource(f) for f in (prompt_completion, sft_config, sft_trainer))
    return {"trainer": "trl", "trl": version("trl"), "recipe": hashlib.sha256(code.encode()).hexdigest()}


class _PeakRSS:
    """Resident memory of this process sampled every ``interval`` s in a thread (peak and samples)."""

    def __init__(self, interval: float = 0.01):
        import threading

        import psutil
        self._proc, self.interval = psutil.Process(), interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


TRAINERS = ("loop", "trl")      # labkit's own train_loop, or TRL's SFTTrainer on the same data and settings


def _train_with_loop(settings: LoraSettings, model, tokenizer, rows):
    """(PEFT model, losses, encoded rows) of :func:`train_loop` on ``rows``."""
    import torch
    from peft import get_peft_model
    torch.manual_seed(settings.seed)          # PEFT draws lora_A's initial values from torch's generator
    model = get_peft_model(model, peft_config(settings))
    encoded = [encode(tokenizer, r) for r in rows]
    return model, (lambda: train_loop(model, encoded, settings, tokenizer.pad_token_id)), encoded


def _train_with_trl(settings: LoraSettings, model, tokenizer, rows, out_dir):
    """(PEFT model, losses, encoded rows) of TRL's SFTTrainer on ``rows`` (:func:`sft_trainer`)."""
    import tempfile
    trainer = sft_trainer(settings, model, tokenizer, rows, tempfile.mkdtemp(prefix="trl-", dir=out_dir))
    encoded = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]

    def run():
        import shutil
        trainer.train()
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)     # save_strategy="no": nothing kept there
        return [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    return trainer.model, run, encoded


def train(settings: LoraSettings, base_folder, out_dir, train_path=TRAIN_PATH, trainer: str = "loop") -> dict:
    """Train one LoRA adapter in this process and save it (PEFT's files + ``metrics.json``).

    ``trainer``: ``"loop"`` (:func:`train_loop`) or ``"trl"`` (TRL's ``SFTTrainer``, :func:`sft_trainer`), with
    the same settings, data and initial adapter. ``metrics.json`` records the loss of every step, seconds, tokens,
    the rows as the trainer encoded them (ids and labels), and resident memory: before the model was loaded,
    after (with the adapter attached), and the peak while training.
    """
    import psutil
    import torch
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}, not {trainer!r}")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    rss_start = psutil.Process().memory_info().rss
    base, tokenizer = load_base(base_folder)
    rows = read_jsonl(train_path)
    model, run, encoded = (_train_with_loop(settings, base, tokenizer, rows) if trainer == "loop"
                           else _train_with_trl(settings, base, tokenizer, rows, out_dir))
    rss_loaded = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with _PeakRSS() as rss:
        losses = run()
    seconds = time.perf_counter() - t0
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    metrics = {"settings": settings.key_fields(), "trainer": trainer, "losses": losses, "steps": len(losses),
               "train_s": seconds, "examples": len(rows), "tokens_per_epoch": sum(len(x) for x, _ in encoded),
               "answer_tokens_per_epoch": sum(sum(t != -100 for t in y) for _, y in encoded),
               "max_example_tokens": max(len(x) for x, _ in encoded),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "rss_start": rss_start, "rss_loaded": rss_loaded, "rss_peak": rss.peak,
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if trainer == "trl":
        import trl
        metrics.update(encoded=encoded, trl=trl.__version__)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    config = json.loads(Path(base_folder, "config.json").read_text())
    (out_dir / BASE_RECORD).write_text(json.dumps({"sha256": base_digest(base_folder), "model_type": config.get("model_type"),
                                                   "architectures": config.get("architectures"), "folder": str(base_folder)}))
    return metrics


@dataclass
class TrainedAdapter:
    path: Path                      # the PEFT adapter folder
    metrics: dict
    cached: bool                    # True: loaded from labkit's cache, no training ran now
    wall_s: float = 0.0             # this call's wall time (child process start-up included)
    key: str = ""

    @property
    def losses(self) -> list[float]:
        return self.metrics["losses"]


def train_cached(settings: LoraSettings, base_folder, train_path=TRAIN_PATH, *, trainer: str = "loop",
                 timeout: float = 1800) -> TrainedAdapter:
    """The adapter for (data, settings, base) from ``cache_dir()/finetune/<key>``, trained first if
    missing — in a child process, so that its peak memory is the training's own and nothing of
    it stays in this process. ``trainer``: as :func:`train`."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}, not {trainer!r}")
    key = cache_key(settings, base_folder, train_path, trainer)
    target = cache_dir() / "finetune" / key
    t0 = time.perf_counter()
    if all((target / f).exists() for f in (*ADAPTER_FILES, "metrics.json")):
        return TrainedAdapter(target, json.loads((target / "metrics.json").read_text()), True, time.perf_counter() - t0, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=target.parent))
    try:
        args = json.dumps({"settings": dataclasses.asdict(settings), "base": str(base_folder),
                           "train": str(train_path), "out": str(tmp), "trainer": trainer})
        out = subprocess.run([sys.executable, "-m", "labkit.finetune", args], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"LoRA training ({trainer}) failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainedAdapter(target, json.loads((target / "metrics.json").read_text()), False, time.perf_counter() - t0, key)


# ----------------------------------------------------------------------------- parameters and memory
# HF model types whose blocks have the extra norms TransformerShape counts (from transformers' modeling files)
QK_NORM_TYPES = {"gemma3", "gemma3_text", "qwen3", "qwen3_moe"}
SANDWICH_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}


@dataclass(frozen=True)
class TransformerShape:
    """The sizes of a Llama/Qwen2-style decoder that decide its training memory (and Gemma 3's extra norms)."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    source: str = ""
    qk_norm: bool = False           # an RMSNorm on each head's query and key (Gemma 3, Qwen3)
    sandwich_norms: bool = False    # two more norms per block, on the attention's and the MLP's outputs (Gemma 2/3)

    @classmethod
    def from_config(cls, config: dict | str | os.PathLike, name: str = "") -> "TransformerShape":
        """From an HF ``config.json`` (a dict, the file, or its folder)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config, name = json.loads(path.read_text()), name or path.parent.name
        heads = config["num_attention_heads"]
        return cls(name=name, hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   layers=config["num_hidden_layers"], heads=heads, kv_heads=config.get("num_key_value_heads", heads),
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                   qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                   qk_norm=config.get("model_type") in QK_NORM_TYPES,
                   sandwich_norms=config.get("model_type") in SANDWICH_NORM_TYPES)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (what QLoRA stores in 4 bits)."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layers * (sum(a * b for a, b in self.linear_shapes().values()) + bias)

    @property
    def n_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = self.layers * ((2 + 2 * self.sandwich_norms) * self.hidden + 2 * self.head_dim * self.qk_norm) + self.hidden
        return self.linear_params + embeddings + norms


# Qwen2.5-7B's config.json (https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json): 7.62 B parameters.
QWEN25_7B = TransformerShape("Qwen2.5-7B", hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                             head_dim=128, vocab=152064, tied_embeddings=False, qkv_bias=True,
                             source="https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json")
# NF4 with double quantization: 4 bits + 0.127 bits of (quantized) block constants per weight
# (Dettmers et al., "QLoRA", 2023, section 3). Embeddings, norms and the output layer stay 16-bit.
NF4_BITS = 4.127
METHODS = ("full", "lora", "qlora")


def lora_parameter_count(shape: TransformerShape, r: int, targets: Sequence[str] = ALL_LINEAR) -> int:
    """Trainable parameters of LoRA: r·(in + out) for each targeted linear layer of every block."""
    shapes = shape.linear_shapes()
    unknown = set(targets) - shapes.keys()
    if unknown:
        raise ValueError(f"unknown target module(s) {sorted(unknown)}: choose among {', '.join(shapes)}")
    return shape.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


COMPUTE = ("fp32", "bf16", "autocast")


def activation_bytes(shape: TransformerShape, tokens: int, *, r: int = 0, targets: Sequence[str] = ALL_LINEAR,
                     compute: str = "fp32", checkpointing: bool = False) -> float:
    """Bytes autograd keeps for the backward pass over all blocks, for ``tokens`` tokens (SDPA
    attention: no seq×seq matrix is kept). ``targets`` are the linear layers whose weights (full)
    or adapters (LoRA) train; ``r`` is 0 for full fine-tuning.

    Per block: the residual-stream inputs of the two norms (2·h); a norm's output when a layer
    reading it trains (h each); SDPA's query, key and value (key and value repeated to all heads)
    and output (4·h); the attention output entering o_proj when it trains (h); in the MLP the gate,
    SiLU(gate) and up (3·i) and their product when down_proj trains (i); LoRA's r-wide
    intermediate per adapted layer. All trained: 9·h + 4·i. Gemma 3's extra norms keep their inputs
    too: 2·h for the norms on the attention's and MLP's outputs, and the query and key (q + kv) for
    its per-head norms.

    ``compute``: ``fp32`` (4 bytes each), ``bf16`` (a bf16 model, 2 bytes), or ``autocast`` (fp32
    weights, bf16 matmuls, as ``torch.autocast`` on a CPU): residuals stay fp32, the rest is bf16,
    every trained layer keeps its *own* bf16 copy of its input, and each frozen weight's bf16 copy
    (output layer included) is kept too: the backward pass multiplies by it. Gradient checkpointing keeps each block's
    input and recomputes one block at a time.
    """
    if compute not in COMPUTE:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE)}, not {compute!r}")
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    t = set(targets)
    n_attn_in, n_mlp_in = len(t & {"q_proj", "k_proj", "v_proj"}), len(t & {"gate_proj", "up_proj"})
    lora_mid = r * len(t) if r else 0
    rest = 4 * q + q * ("o_proj" in t) + 3 * i + i * ("down_proj" in t) + lora_mid
    norm_inputs = 2 * h + 2 * h * shape.sandwich_norms + (q + shape.kv_heads * shape.head_dim) * shape.qk_norm
    if compute == "autocast":          # own bf16 copy per trained layer; norms in fp32; frozen weights' copies
        per_block = norm_inputs * 4 + (h * n_attn_in + h * n_mlp_in + rest) * 2
        frozen = (shape.linear_params + shape.vocab * shape.hidden) * 2 if r else 0    # + the output layer
    else:
        width = 4 if compute == "fp32" else 2
        per_block = (norm_inputs + h * bool(n_attn_in) + h * bool(n_mlp_in) + rest) * width
        frozen = 0
    blocks = (shape.layers * h * (4 if compute != "bf16" else 2) + per_block) if checkpointing else shape.layers * per_block
    return tokens * blocks + frozen


def training_memory(shape: TransformerShape, method: str, *, tokens: int, loss_tokens: int | None = None,
                    r: int = 16, targets: Sequence[str] = ALL_LINEAR, compute: str = "fp32",
                    checkpointing: bool = False) -> dict[str, float]:
    """Bytes to train ``shape`` one step on ``tokens`` tokens: weights, gradients, AdamW states
    (two fp32 values per trained parameter), activations (:func:`activation_bytes`) and logits.

    * ``full``: every parameter trains. fp32: 4 + 4 + 8 = 16 bytes per parameter; bf16 mixed
      precision: bf16 weights and gradients plus an fp32 master copy, again 2 + 4 + 2 + 8 = 16.
    * ``lora``: frozen base (fp32, or bf16 when ``compute="bf16"``); the adapter in fp32 (4 + 4 + 8 bytes each).
    * ``qlora``: as lora, with the blocks' linear weights in NF4 (:data:`NF4_BITS`).

    Logits: ``loss_tokens`` (default ``tokens``) × vocabulary, in fp32, with their gradient.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    n = shape.n_params
    base_width = 2 if compute == "bf16" else 4
    if method == "full":
        weights = n * (4 if compute == "fp32" else 2 + 4)
        trained, grads, optimizer = n, n * (4 if compute == "fp32" else 2), n * 8
        acts = activation_bytes(shape, tokens, targets=ALL_LINEAR, compute=compute, checkpointing=checkpointing)
    else:
        trained = lora_parameter_count(shape, r, targets)
        base = n * base_width if method == "lora" else shape.linear_params * NF4_BITS / 8 + (n - shape.linear_params) * 2
        weights, grads, optimizer = base + trained * 4, trained * 4, trained * 8
        acts = activation_bytes(shape, tokens, r=r, targets=targets, compute=compute, checkpointing=checkpointing)
    logits = (tokens if loss_tokens is None else loss_tokens) * shape.vocab * 4 * 2
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": acts, "logits": logits}
    return {**parts, "total": sum(parts.values()), "trained_params": trained}


def saved_tensor_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs — the measured
    counterpart of :func:`activation_bytes` (storages shared by several saves count once;
    ``exclude``: tensors not to count, e.g. the model's own parameters, which are saved by reference)."""
    import torch
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(seen.values())


# ----------------------------------------------------------------------------- adapters: checks, merge, GGUF
def _read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no weights read); CorruptModelError otherwise."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptModelError(f"{path} is not a readable safetensors file ({exc}): it is truncated or corrupt. "
                                "Train or download the adapter again.") from None
    if ends and 8 + n + max(ends) > size:
        raise CorruptModelError(f"{path} is truncated: its header describes {8 + n + max(ends):,} bytes but the file "
                                f"has {size:,}. Train or download the adapter again.")
    return shapes


def check_adapter(adapter_dir: str | os.PathLike, base_folder: str | os.PathLike, *, strict: bool = True) -> dict:
    """Check that a PEFT LoRA adapter folder fits an HF base folder before anything loads it.

    Refused, with the file and the mismatch named: a missing or unreadable ``adapter_config.json``
    or ``adapter_model.safetensors`` (:class:`CorruptModelError`); an adapter for modules the base
    does not have — another architecture — or with shapes that do not match the base's layers, or
    (``strict``) trained on weights with another digest than the base's (:class:`AdapterMismatchError`).
    Returns ``{"r", "alpha", "targets", "n_matrices"}``.
    """
    adapter_dir, base_folder = Path(adapter_dir), Path(base_folder)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise CorruptModelError(f"{p} is missing: {adapter_dir} is not a complete PEFT adapter folder "
                                    "(save it with model.save_pretrained(folder)).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptModelError(f"{cfg_path} is not valid JSON ({exc}): the adapter folder is corrupt.") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, not a LoRA adapter.")
    base_cfg = json.loads((base_folder / "config.json").read_text())
    record = adapter_dir / BASE_RECORD
    if record.exists():
        rec = json.loads(record.read_text())
        if rec.get("model_type") and rec["model_type"] != base_cfg.get("model_type"):
            raise AdapterMismatchError(
                f"{adapter_dir.name} was trained on a {rec['model_type']} model, but {base_folder} is "
                f"{base_cfg.get('model_type')}: an adapter only applies to the architecture it was trained on.")
    base_shapes = {}
    for f in sorted(base_folder.glob("*.safetensors")):
        base_shapes.update(_read_safetensors_shapes(f))
    pairs = _lora_pairs(_read_safetensors_shapes(weights), weights)
    arch = (base_cfg.get("architectures") or [base_cfg.get("model_type")])[0]
    for module, (a, b) in sorted(pairs.items()):
        w = base_shapes.get(module + ".weight")
        if w is None:
            raise AdapterMismatchError(
                f"{weights} adapts {module}, which {base_folder} ({arch}) does not have: the adapter was made for "
                "another architecture. Use the base model it was trained on.")
        out_f, in_f = w
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise AdapterMismatchError(
                f"{weights} does not fit {base_folder}: {module} is {in_f}→{out_f} in the base, but the adapter's "
                f"lora_A is {a[0]}x{a[1]} and lora_B {b[0]}x{b[1]} — it was trained on a different base model.")
    if strict and record.exists():
        recorded, actual = json.loads(record.read_text()).get("sha256"), base_digest(base_folder)
        if recorded and recorded != actual:
            raise AdapterMismatchError(
                f"{adapter_dir.name} was trained on base weights {recorded[:12]}…, but {base_folder} has {actual[:12]}…: "
                "same shapes, different weights, so the update no longer means what it learned. Use the base "
                "it was trained on (or strict=False to apply it anyway).")
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "n_matrices": len(pairs),
            "targets": sorted({m.rsplit(".", 1)[-1] for m in pairs})}


def _lora_pairs(shapes: dict[str, tuple], path: Path) -> dict[str, tuple[tuple, tuple]]:
    """{base module name: (lora_A shape, lora_B shape)} from PEFT tensor names."""
    halves: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in name:
                module = name.split(marker)[0].removeprefix("base_model.model.")
                halves.setdefault(module, {})[half] = shape
    if not halves:
        raise CorruptModelError(f"{path} holds no lora_A/lora_B tensors: it is not a LoRA adapter.")
    for module, pair in halves.items():
        if len(pair) != 2:
            raise CorruptModelError(f"{path}: {module} has only {', '.join(pair)}; the adapter is incomplete.")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in halves.items()}


def load_with_adapter(base_folder, adapter_dir, *, merge: bool = False):
    """(model, tokenizer): the base with the adapter applied (checked first); ``merge`` folds B·A·alpha/r
    into the base weights (``merge_and_unload``), giving a plain model with the base's architecture."""
    from peft import PeftModel
    check_adapter(adapter_dir, base_folder)
    model, tokenizer = load_base(base_folder)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return (model.merge_and_unload() if merge else model), tokenizer


def merge_adapter(base_folder, adapter_dir, out_dir) -> Path:
    """An HF folder (weights, config, tokenizer with its chat template) of base + merged adapter,
    ready for ``convert_hf_to_gguf.py``."""
    model, tokenizer = load_with_adapter(base_folder, adapter_dir, merge=True)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def adapter_to_gguf(adapter_dir, base_folder, outfile, outtype: str = "f32", timeout: float = 600) -> Path:
    """A checked PEFT adapter (:func:`check_adapter`) to llama.cpp's LoRA GGUF, through
    ``convert_lora_to_gguf.py`` (:func:`labkit.llama_tools.convert_lora`)."""
    from .llama_tools import convert_lora
    check_adapter(adapter_dir, base_folder)
    return convert_lora(adapter_dir, base_folder, outfile, outtype, timeout)


def _main(argv: list[str]) -> int:
    """``python -m labkit.finetune '{"settings": ..., "base": ..., "train": ..., "out": ...}'`` (train_cached's child)."""
    job = json.loads(argv[0])
    settings = LoraSettings(**{**job["settings"], "targets": tuple(job["settings"]["targets"])})
    train(settings, job["base"], job["out"], job["train"], job.get("trainer", "loop"))
    return 0


if __name__ == "__main__":
    # run the importable labkit.finetune, not this __main__ copy of it: one set of functions in the child, the same
    # a patch (a test's mutation) or the parent's cache key sees
    from labkit import finetune as _module
    sys.exit(_module._main(sys.argv[1:]))
