"""Images: what a vision model pays for one, and what a text-only server answers (chapter 04).

A vision-language model turns an image into *tokens* that sit in the context beside the text and
take KV cache like text does. How many depends on the model's published preprocessing:

* **Qwen2-VL** (``Qwen2VLImageProcessor``, transformers ``models/qwen2_vl/image_processing_qwen2_vl.py``,
  function ``smart_resize``): the image is resized so both sides are multiples of 28 px and its area lies
  in ``[min_pixels, max_pixels]``; 14-px patches are merged 2×2 (``merge_size``), so one token per 28×28 px
  (``processing_qwen2_vl.py``: ``grid_thw.prod() // merge_size**2``), plus ``<|vision_start|>`` and
  ``<|vision_end|>`` around them. The cost grows with the pixels.
* **MiniCPM-V 2.6** (``MiniCPMVImageProcessor``, ``image_processing_minicpmv.py`` of its model repository,
  functions ``get_sliced_grid`` and ``get_slice_image_placeholder``): a 448-px thumbnail plus up to 9 slices
  chosen to match the aspect ratio, each squeezed by the resampler into 64 query tokens, with marker tokens
  around each. The cost is capped at 10 × 64 visual tokens, whatever the resolution.

:func:`image_cost` turns those tokens into a share of the context and bytes of KV cache with the lab's
one KV formula (:meth:`labkit.memory.ModelConfig.kv_cache_bytes`).

A text-only model cannot read an image at all. :class:`RefuseMedia` is the check labkit puts in front of
llama-cpp-python's server (started through :mod:`labkit.repack`), which otherwise answers an ``image_url``
part with a 500 about string concatenation: a 400 that says what is missing.

>>> qwen2_vl_tokens(1280, 720).visual, minicpmv_tokens(1280, 720).visual
(1196, 448)
>>> minicpmv_grid(448, 448) is None, minicpmv_grid(1280, 720)
(True, (3, 2))
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from .memory import ModelConfig

# ---------------------------------------------------------------------------------------------- Qwen2-VL
QWEN2_VL_FACTOR = 28                           # patch_size 14 × merge_size 2: one token per 28×28 px
QWEN2_VL_MIN_PIXELS = 56 * 56                  # Qwen2VLImageProcessor's default: at least 4 tokens
QWEN2_VL_PROCESSOR_MAX_PIXELS = 28 * 28 * 1280  # its class default: at most 1280 tokens
# What the released checkpoints ship (Qwen/Qwen2-VL-*-Instruct preprocessor_config.json: max_pixels 12845056;
# the model card: "4-16384" visual tokens per image) and so what `vllm serve Qwen/Qwen2-VL-2B-Instruct` uses.
QWEN2_VL_CHECKPOINT_MAX_PIXELS = 28 * 28 * 16384
QWEN2_VL_MARKERS = 2                           # <|vision_start|> … <|vision_end|>


@dataclass(frozen=True)
class ImageTokens:
    """What one image costs a model: ``visual`` embeddings from its encoder (what vLLM counts) and
    ``prompt`` tokens in the context (those plus the markers around them)."""

    model: str
    width: int
    height: int
    visual: int
    prompt: int
    layout: str                  # how the preprocessing cut it, in words


def qwen2_vl_resize(width: int, height: int, min_pixels: int = QWEN2_VL_MIN_PIXELS,
                    max_pixels: int = QWEN2_VL_CHECKPOINT_MAX_PIXELS) -> tuple[int, int]:
    """The (width, height) Qwen2-VL's ``smart_resize`` gives an image: sides rounded to multiples of 28,
    scaled down (floor) above ``max_pixels`` or up (ceil) below ``min_pixels``, aspect ratio kept."""
    if min(width, height) <= 0:
        raise ValueError("width and height must be positive")
    if max(width, height) / min(width, height) > 200:          # smart_resize refuses these too
        raise ValueError(f"aspect ratio {max(width, height) / min(width, height):.0f}:1 is over Qwen2-VL's limit of 200")
    f = QWEN2_VL_FACTOR
    w, h = round(width / f) * f, round(height / f) * f
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w, h = max(f, math.floor(width / beta / f) * f), max(f, math.floor(height / beta / f) * f)
    elif w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w, h = math.ceil(width * beta / f) * f, math.ceil(height * beta / f) * f
    return w, h


def qwen2_vl_tokens(width: int, height: int, min_pixels: int = QWEN2_VL_MIN_PIXELS,
                    max_pixels: int = QWEN2_VL_CHECKPOINT_MAX_PIXELS, model: str = "Qwen2-VL") -> ImageTokens:
    """Tokens of one image for Qwen2-VL: one per 28×28 px of the resized image, plus its two markers."""
    w, h = qwen2_vl_resize(width, height, min_pixels, max_pixels)
    cols, rows = w // QWEN2_VL_FACTOR, h // QWEN2_VL_FACTOR
    return ImageTokens(model, width, height, cols * rows, cols * rows + QWEN2_VL_MARKERS,
                       f"resized to {w}×{h} px: {cols}×{rows} tokens of 28×28 px")


# ---------------------------------------------------------------------------------------------- MiniCPM-V 2.6
MINICPMV_SCALE = 448          # scale_resolution: the thumbnail's and each slice's target side
MINICPMV_MAX_SLICES = 9       # max_slice_nums (model card: "up to 1.8 million pixels (e.g., 1344x1344)")
MINICPMV_QUERIES = 64         # image_feature_size: the resampler's query tokens per thumbnail or slice
MINICPMV_MARKERS = 2          # <image> … </image> around the thumbnail, <slice> … </slice> around each slice:
                              # one token each (tokenization_minicpmv_fast.py converts them with convert_tokens_to_ids)


def minicpmv_grid(width: int, height: int, max_slices: int = MINICPMV_MAX_SLICES,
                  scale: int = MINICPMV_SCALE) -> tuple[int, int] | None:
    """MiniCPM-V 2.6's slice grid (columns, rows), or None when the thumbnail alone is used.

    ``get_sliced_grid``: n = min(ceil(area / 448²), max_slices) slices; none when n ≤ 1; otherwise, among the
    grids of n − 1, n and n + 1 slices (not 1, not above the maximum), the one whose log aspect ratio is
    nearest the image's (the first found on a tie)."""
    if min(width, height) <= 0:
        raise ValueError("width and height must be positive")
    wanted = min(math.ceil(width * height / scale ** 2), max_slices)
    if wanted <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_error = (1, 1), math.inf
    for n in (wanted - 1, wanted, wanted + 1):
        if n == 1 or n > max_slices:
            continue
        for cols in (c for c in range(1, n + 1) if n % c == 0):
            error = abs(log_ratio - math.log(cols / (n // cols)))
            if error < best_error:
                best, best_error = (cols, n // cols), error
    return best


def minicpmv_tokens(width: int, height: int, image_index: int = 0, max_slices: int = MINICPMV_MAX_SLICES,
                    model: str = "MiniCPM-V-2.6") -> ImageTokens:
    """Tokens of one image for MiniCPM-V 2.6 (``get_slice_image_placeholder`` with ``use_image_id``):
    ``<image_id>N</image_id>``, the thumbnail's 64 queries in ``<image>…</image>``, each slice's 64 in
    ``<slice>…</slice>``, rows of slices joined by a newline token."""
    grid = minicpmv_grid(width, height, max_slices)
    cols, rows = grid or (0, 0)
    visual = (1 + cols * rows) * MINICPMV_QUERIES
    image_id = 2 + len(str(image_index))          # Qwen2's tokenizer splits a number into one token per digit
    prompt = image_id + visual + (1 + cols * rows) * MINICPMV_MARKERS + max(rows - 1, 0)
    layout = f"thumbnail + {cols}×{rows} slices" if grid else "thumbnail only"
    return ImageTokens(model, width, height, visual, prompt, layout)


# ---------------------------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class VisionModel:
    """A vision model: its language model's architecture (what the KV cache is made of) and how it counts
    an image's tokens (``tokens(width, height, **options) -> ImageTokens``)."""

    name: str
    llm: ModelConfig
    tokens: Callable[..., ImageTokens]


# Language-model numbers from each checkpoint's config.json on Hugging Face (text_config / llm_config);
# parameter counts as the model pages state them (vision encoder included).
VISION_MODELS: dict[str, VisionModel] = {m.name: m for m in [
    VisionModel("Qwen2-VL-2B", ModelConfig("Qwen2-VL-2B", 2.21e9, 28, 12, 2, 128, 1536, 8960, 151936,
                                           "huggingface.co/Qwen/Qwen2-VL-2B-Instruct"),
                lambda w, h, **kw: qwen2_vl_tokens(w, h, model="Qwen2-VL-2B", **kw)),
    VisionModel("Qwen2-VL-7B", ModelConfig("Qwen2-VL-7B", 8.29e9, 28, 28, 4, 128, 3584, 18944, 152064,
                                           "huggingface.co/Qwen/Qwen2-VL-7B-Instruct"),
                lambda w, h, **kw: qwen2_vl_tokens(w, h, model="Qwen2-VL-7B", **kw)),
    # MiniCPM-V 2.6 = SigLIP-400M + Qwen2-7B: the same language model as Qwen2-VL-7B, so the same KV per token
    VisionModel("MiniCPM-V-2.6", ModelConfig("MiniCPM-V-2.6", 8.1e9, 28, 28, 4, 128, 3584, 18944, 151666,
                                             "huggingface.co/openbmb/MiniCPM-V-2_6"),
                lambda w, h, **kw: minicpmv_tokens(w, h, model="MiniCPM-V-2.6", **kw)),
]}


@dataclass(frozen=True)
class ImageCost:
    """One image's tokens as a share of a context of ``n_ctx`` tokens and as bytes of KV cache."""

    tokens: ImageTokens
    n_ctx: int
    context_share: float         # prompt tokens ÷ n_ctx (above 1: the image alone does not fit)
    kv_bytes: float              # KV cache those prompt tokens hold (labkit.memory's formula, KV heads)


def image_cost(model: str, width: int, height: int, n_ctx: int = 8192, cache_type: str = "f16",
               **options) -> ImageCost:
    """What one ``width``×``height`` image costs ``model`` (a key of :data:`VISION_MODELS`) in context and
    KV memory; ``options`` go to its token count (``max_pixels=...`` for Qwen2-VL, ``max_slices=...``)."""
    try:
        vm = VISION_MODELS[model]
    except KeyError:
        raise ValueError(f"unknown vision model {model!r}; choose one of {', '.join(VISION_MODELS)}") from None
    tokens = vm.tokens(width, height, **options)
    return ImageCost(tokens, n_ctx, tokens.prompt / n_ctx, vm.llm.kv_cache_bytes(tokens.prompt, cache_type))


def cost_table(sizes=((448, 448), (1280, 720), (4032, 3024)), models=tuple(VISION_MODELS), n_ctx: int = 8192,
               cache_type: str = "f16") -> list[dict]:
    """One row per (model, image size): tokens, context share and KV MiB, ready for a DataFrame."""
    rows = []
    for model in models:
        for width, height in sizes:
            cost = image_cost(model, width, height, n_ctx, cache_type)
            rows.append({"model": model, "image": f"{width}×{height}", "preprocessing": cost.tokens.layout,
                         "visual tokens": cost.tokens.visual, "prompt tokens": cost.tokens.prompt,
                         f"share of {n_ctx}": round(cost.context_share, 3),
                         f"KV MiB ({cache_type})": round(cost.kv_bytes / 2**20, 1)})
    return rows


# Serving a vision model: the projector (the image encoder) is a second file for llama-server, and vLLM caps
# images per prompt; both cap an image's tokens at 1280 (Qwen2-VL's processor default) instead of 16384.
# tests/test_check.py runs each through the program's own argument parser (labkit.check.command_verdicts).
VISION_COMMANDS = {
    "llama-server": "llama-server -m Qwen2-VL-2B-Instruct-Q4_K_M.gguf --mmproj mmproj-Qwen2-VL-2B-Instruct-f16.gguf "
                    "-c 8192 --image-max-tokens 1280",
    "vllm": "vllm serve Qwen/Qwen2-VL-2B-Instruct --max-model-len 8192 --limit-mm-per-prompt '{\"image\": 2}' "
            "--mm-processor-kwargs '{\"max_pixels\": 1003520}'",
}


# ---------------------------------------------------------------------------------------------- a text-only server
MEDIA_PARTS = {"image_url": "images", "input_audio": "audio"}     # OpenAI chat content parts a text model cannot read
LLAMA_CPP_PYTHON_HINT = ("llama-cpp-python's server reads images only with a vision model's projector: "
                         "--clip_model_path and a vision --chat_format (e.g. llava-1-5)")


def media_refusal(body: bytes, model: str = "this model", hint: str = "") -> dict | None:
    """OpenAI's error object for a chat request carrying images or audio to a text-only model, or None
    (no such part, or not a JSON chat request: the server's own validation answers that)."""
    try:
        messages = json.loads(body).get("messages")
    except (ValueError, AttributeError):
        return None
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PARTS:
                text = f"{model} does not support {MEDIA_PARTS[kind]}: it is a text-only model"
                text += f" ({hint})" if hint and kind == "image_url" else ""     # the hint says how to serve images
                return {"error": {"message": text, "type": "invalid_request_error",
                                  "param": f"messages[{i}].content[{j}]", "code": "unsupported_content"}}
    return None


async def read_body(receive) -> bytes | None:
    """A request's whole body from an ASGI ``receive`` (several ``http.request`` messages when it is large);
    None when the client disconnected first. Shared by the lab's ASGI layers in front of llama-cpp-python."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class RefuseMedia:
    """ASGI middleware for a text-only OpenAI-compatible server: a chat request with an image (or audio)
    part is answered 400 with :func:`media_refusal`'s error before the app sees it; anything else passes
    through, its body replayed unchanged."""

    def __init__(self, app, model: str = "this model", hint: str = "", paths=("/v1/chat/completions",)):
        self.app, self.model, self.hint, self.paths = app, model, hint, tuple(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:                               # the client left before sending its body
            return None
        refusal = media_refusal(body, self.model, self.hint)
        if refusal is not None:
            payload = json.dumps(refusal).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            return await send({"type": "http.response.body", "body": payload})
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()                 # later reads wait for a disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, word in enumerate(args):
        if word == flag and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def guard_llama_cpp_server(args: list[str]) -> bool:
    """Before ``python -m llama_cpp.server ARGS`` runs (:func:`labkit.repack.main`): unless ARGS load a
    projector (``--clip_model_path``) or a config file, make the app it builds refuse image and audio
    parts with a 400. Returns whether it did."""
    if _flag_value(args, "--clip_model_path") or _flag_value(args, "--config_file") or os.environ.get("CONFIG_FILE"):
        return False
    import llama_cpp.server.app as server_app
    from starlette.middleware import Middleware
    original, model = server_app.create_app, _flag_value(args, "--model_alias") or "this model"

    def create_app(*a, **kw):
        app = original(*a, **kw)
        # innermost (after CORS): a refusal still carries the CORS headers a browser needs to read it
        app.user_middleware.append(Middleware(RefuseMedia, model=model, hint=LLAMA_CPP_PYTHON_HINT))
        return app
    server_app.create_app = create_app           # llama_cpp.server.__main__ imports it when it runs, after this
    return True
