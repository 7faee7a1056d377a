"""Click-instead-of-edit widgets for the chapters (ipywidgets).

:func:`memory_calculator` (chapters 00 and 01): pick a published model, a quantization and a
context length; the breakdown from :func:`labkit.memory.estimate` updates live.
"""
from __future__ import annotations


def memory_calculator(model: str = "Llama-3.1-8B", quant: str = "Q4_K_M", n_ctx: int = 8192, kv_type: str = "f16"):
    """A VBox of controls plus a result line (CSS class ``labkit-memcalc-result``).

    The returned box has ``.controls`` (dict of the widgets) and ``.result`` (the HTML widget)
    so tests and notebooks can drive it.
    """
    import ipywidgets as w
    from . import memory

    controls = {
        "model": w.Dropdown(options=list(memory.PRESETS), value=model, description="model"),
        "quant": w.Dropdown(options=["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"],
                            value=quant, description="weights"),
        "n_ctx": w.IntSlider(value=n_ctx, min=512, max=131072, step=512, description="context",
                             continuous_update=False),
        "kv_type": w.Dropdown(options=list(memory.KV_BYTES_PER_ELEMENT), value=kv_type, description="KV cache"),
    }
    result = w.HTML()
    result.add_class("labkit-memcalc-result")

    def update(_=None):
        e = memory.estimate(controls["model"].value, quant=controls["quant"].value,
                            n_ctx=controls["n_ctx"].value, kv_type=controls["kv_type"].value)
        gib = 2**30
        result.value = (f"<b>{e.total_bytes / gib:.2f} GiB</b> = weights {e.weights_bytes / gib:.2f} + "
                        f"KV cache {e.kv_bytes / gib:.2f} ({e.n_ctx_cells:,} tokens, {e.kv_type}) + "
                        f"overhead {e.overhead_bytes / gib:.2f} GiB")

    for control in controls.values():
        control.observe(update, names="value")
    update()
    box = w.VBox(list(controls.values()) + [result])
    box.controls, box.result = controls, result
    return box
