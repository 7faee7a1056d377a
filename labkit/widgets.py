"""Click-instead-of-edit widgets for the chapters (ipywidgets).

* :func:`memory_calculator` (chapters 00 and 01): pick a published model *or a GGUF file*, a
  quantization and a context length; the breakdown from :func:`labkit.memory.estimate` and the
  devices it fits update live.
* :func:`quant_explorer` (chapter 01): pick a tensor of a GGUF and a ggml block format; see its
  size, bits per weight and error, computed with :mod:`labkit.quant`.
* :func:`chat_box` (chapter 03): a chat that streams the reply token by token from llama-cpp-python
  or any OpenAI-compatible server, and shows the measured speed.
* The RAG question box of chapter 05 lives with its pipeline: :func:`labkit.rag.qa_widget`.

Every widget returns a box with its controls as attributes, so tests (and the browser test) can
drive it exactly as a learner would.
"""
from __future__ import annotations

import html
import os
from pathlib import Path

QUANT_CHOICES = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]


def memory_calculator(model: str = "Llama-3.1-8B", quant: str = "Q4_K_M", n_ctx: int = 8192, kv_type: str = "f16",
                      gguf_files: dict[str, str | os.PathLike] | None = None):
    """A VBox of controls plus a result line (CSS class ``labkit-memcalc-result``).

    ``gguf_files`` adds GGUF files (label → path) to the model list: for those the weights are the
    file's real tensor bytes and its header's hyper-parameters, so the quantization menu is disabled.
    The returned box has ``.controls`` (dict of the widgets) and ``.result`` (the HTML widget).
    """
    import ipywidgets as w

    from . import memory

    files = {label: Path(p) for label, p in (gguf_files or {}).items()}
    controls = {
        "model": w.Dropdown(options=list(files) + list(memory.PRESETS), value=model, description="model"),
        "quant": w.Dropdown(options=QUANT_CHOICES, value=quant, description="weights"),
        "n_ctx": w.IntSlider(value=n_ctx, min=512, max=131072, step=512, description="context",
                             continuous_update=False),
        "kv_type": w.Dropdown(options=list(memory.KV_BYTES_PER_ELEMENT), value=kv_type, description="KV cache"),
    }
    result = w.HTML()
    result.add_class("labkit-memcalc-result")

    def update(_=None):
        chosen = controls["model"].value
        is_file = chosen in files
        controls["quant"].disabled = is_file
        e = memory.estimate(files[chosen] if is_file else chosen, quant=None if is_file else controls["quant"].value,
                            n_ctx=controls["n_ctx"].value, kv_type=controls["kv_type"].value)
        gib = 2**30
        fits = [name for name, capacity in memory.DEVICES if e.fits(capacity)]
        result.value = (f"<b>{e.total_bytes / gib:.2f} GiB</b> = weights {e.weights_bytes / gib:.2f}"
                        f"{' (' + html.escape(e.quant) + ', from the file)' if is_file else ''} + "
                        f"KV cache {e.kv_bytes / gib:.2f} ({e.n_ctx_cells:,} tokens, {e.kv_type}) + "
                        f"overhead {e.overhead_bytes / gib:.2f} GiB<br>fits (90% usable): "
                        + (", ".join(fits) or "none of the listed devices"))

    for control in controls.values():
        control.observe(update, names="value")
    update()
    box = w.VBox(list(controls.values()) + [result])
    box.controls, box.result = controls, result
    return box


def quant_explorer(gguf_path, tensor: str = "blk.0.ffn_down.weight", qtype: str = "Q4_K"):
    """Pick a 2-D tensor of ``gguf_path`` and a ggml block format: size, bits/weight, RMSE, SNR.

    The tensor is decoded from the file with :func:`labkit.quant.dequantize` and re-quantized with
    :func:`labkit.quant.quantize` (bit-exact with llama.cpp). A K-quant on rows that are not a
    multiple of 256 is refused with the reason, as llama.cpp falls back to a legacy type there.
    ``.controls``, ``.result`` (HTML) and ``.plot`` (an Image of the error histogram) are exposed.
    The histogram is rendered to PNG bytes, not through an ``Output`` widget: headless executors
    (papermill/nbclient) track Output widgets' captured messages, and that tracking was seen to
    stall a run for the whole cell timeout.
    """
    import ipywidgets as w
    import numpy as np
    from gguf import GGUFReader

    from . import quant

    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors if len(t.shape) == 2}
    if tensor not in tensors:
        tensor = next(iter(tensors))
    formats = [q for q in quant.QUANTIZE_TYPES if q.startswith("Q")]   # the block formats labkit.quant writes
    controls = {"tensor": w.Dropdown(options=list(tensors), value=tensor, description="tensor"),
                "qtype": w.Dropdown(options=formats, value=qtype if qtype in formats else formats[0], description="format")}
    result, plot = w.HTML(), w.Image(format="png")
    result.add_class("labkit-quant-explorer-result")
    decoded: dict[str, np.ndarray] = {}

    def weights(name):
        if name not in decoded:
            t = tensors[name]
            decoded[name] = quant.dequantize(np.asarray(t.data).tobytes(), t.tensor_type.name,
                                             tuple(int(s) for s in reversed(t.shape)))
        return decoded[name]

    def update(_=None):
        name, qt = controls["tensor"].value, controls["qtype"].value
        W = weights(name)
        stored = tensors[name].tensor_type.name
        block = quant.layout(qt).block_size
        if W.shape[-1] % block:
            result.value = (f"<b>{html.escape(qt)} cannot store {html.escape(name)}</b>: its rows hold {W.shape[-1]} "
                            f"weights, not a multiple of {qt}'s block of {block}; llama.cpp falls back to a legacy type here.")
            return
        W_hat = quant.roundtrip(W, qt)
        s = quant.error_stats(W, W_hat)
        result.value = (f"{html.escape(name)} {W.shape[0]}×{W.shape[1]} (stored as {stored}) → <b>{html.escape(qt)}</b>: "
                        f"{quant.n_bytes(W.shape, qt) / 2**20:.2f} MiB, {quant.bits_per_weight(qt):g} bits/weight, "
                        f"RMSE {s['rmse']:.2e}, max error {s['max_abs_error']:.2e}, SNR {s['snr_db']:.1f} dB")
        plot.value = _histogram_png((W_hat - W).ravel(), f"{name} as {qt}")

    for control in controls.values():
        control.observe(update, names="value")
    update()
    box = w.VBox([w.HBox(list(controls.values())), result, plot])
    box.controls, box.result, box.plot = controls, result, plot
    return box


def _histogram_png(values, title: str) -> bytes:
    """A log-count histogram as PNG bytes (matplotlib's Agg canvas: no display, no pyplot state)."""
    import io

    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 2.4))
    ax = fig.add_subplot()
    ax.hist(values, bins=120, color="indianred")
    ax.set_yscale("log")
    ax.set_xlabel("reconstruction error (weight units)")
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def chat_box(engine, *, model: str | None = None, system: str | None = None, max_tokens: int = 128,
             temperature: float = 0.7):
    """A chat that streams replies from ``engine``: a ``llama_cpp.Llama`` or an OpenAI client.

    For an OpenAI client (e.g. ``server.openai()``), pass ``model``. History is kept, so follow-up
    questions work; each reply ends with its measured time to first token and decode speed
    (:func:`labkit.llamacpp_lab.timed_stream`). ``.send(text)`` does what pressing Send does.
    """
    import ipywidgets as w

    from .streams import timed_stream

    is_llama = hasattr(engine, "create_chat_completion")
    if not is_llama and not model:
        raise ValueError("chat_box with an OpenAI client needs model= (e.g. server.model)")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    transcript = w.HTML()
    transcript.add_class("labkit-chat-transcript")
    text = w.Text(placeholder="Say something, then press Send", layout=w.Layout(width="70%"))
    send_button = w.Button(description="Send", button_style="primary")
    clear_button = w.Button(description="Clear")
    status = w.HTML()
    turns: list[str] = []

    def render(partial: str = ""):
        body = "".join(turns) + (f"<p><b>model:</b> {html.escape(partial)}▌</p>" if partial else "")
        transcript.value = f"<div style='max-height:300px;overflow:auto'>{body}</div>"

    def stream(messages):
        if is_llama:
            return engine.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                 temperature=temperature, stream=True)
        return engine.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                              temperature=temperature, stream=True)

    def send(message: str | None = None) -> str:
        message = (text.value if message is None else message).strip()
        if not message:
            return ""
        text.value = ""
        history.append({"role": "user", "content": message})
        turns.append(f"<p><b>you:</b> {html.escape(message)}</p>")
        pieces: list[str] = []
        send_button.disabled = True
        try:
            reply, timing = timed_stream(stream(history), echo=lambda p: (pieces.append(p), render("".join(pieces))))
        except Exception as exc:                      # show it in the box, keep the chat usable
            history.pop()
            turns.append(f"<p style='color:#b00'><b>error:</b> {html.escape(str(exc))}</p>")
            render()
            return ""
        finally:
            send_button.disabled = False
        history.append({"role": "assistant", "content": reply})
        turns.append(f"<p><b>model:</b> {html.escape(reply)}</p>")
        render()
        status.value = (f"{timing.output_tokens} tokens; first after {timing.ttft * 1000:.0f} ms, "
                        f"then {timing.decode_tps:.1f} tok/s")
        return reply

    def clear(_=None):
        del history[1 if system else 0:]
        turns.clear()
        render()
        status.value = ""

    send_button.on_click(lambda _: send())
    clear_button.on_click(clear)
    render()
    box = w.VBox([transcript, w.HBox([text, send_button, clear_button]), status])
    box.send, box.clear, box.history, box.transcript, box.status, box.text = send, clear, history, transcript, status, text
    return box
