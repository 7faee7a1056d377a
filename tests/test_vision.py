"""labkit.vision: an image's tokens for Qwen2-VL and MiniCPM-V 2.6 worked out by hand from their published
preprocessing, their context share and KV bytes by the lab's one KV formula, and the 400 a text-only
llama-cpp-python server gives an image (in process: no engine)."""
import json

import pytest

from labkit import memory, vision

# ------------------------------------------------------------------------------------------------ Qwen2-VL


def test_qwen2_vl_tokens_worked_by_hand():
    # 1280×720: sides rounded to multiples of 28: round(1280/28) = round(45.71) = 46 → 1288, round(720/28) =
    # round(25.71) = 26 → 728; 1288 × 728 = 937,664 px lies inside [3,136, 1,003,520], so no rescale: 46 × 26 =
    # 1196 tokens (one per 28×28 px: 14-px patches merged 2×2), + <|vision_start|> and <|vision_end|> = 1198.
    t = vision.qwen2_vl_tokens(1280, 720)
    assert vision.qwen2_vl_resize(1280, 720) == (1288, 728)
    assert (t.visual, t.prompt) == (1196, 1198) and "46×26" in t.layout
    # 448×448: 448 = 16 × 28 exactly: 16 × 16 = 256 tokens, 258 with the markers.
    t = vision.qwen2_vl_tokens(448, 448)
    assert (t.visual, t.prompt) == (256, 258)
    # the processor's defaults and the checkpoints' agree on both: neither image reaches 1,003,520 px
    assert vision.qwen2_vl_tokens(1280, 720, max_pixels=vision.QWEN2_VL_PROCESSOR_MAX_PIXELS).visual == 1196


def test_qwen2_vl_a_tiny_image_is_scaled_up_to_min_pixels():
    # 16×16: round(16/28) = 1 → 28×28 = 784 px < min_pixels 3,136 = 56². beta = sqrt(3136 / 256) = 3.5;
    # ceil(16 × 3.5 / 28) = ceil(2.0) = 2 → 56×56 px: 2 × 2 = 4 tokens, 6 with the markers.
    assert vision.qwen2_vl_resize(16, 16) == (56, 56)
    t = vision.qwen2_vl_tokens(16, 16)
    assert (t.visual, t.prompt) == (4, 6)


def test_qwen2_vl_a_huge_image_is_scaled_down_to_max_pixels():
    # 4032×3024 (a 12 MP phone photo): 4032 = 144 × 28 and 3024 = 108 × 28, 12,192,768 px.
    # With the processor's class default max_pixels = 28² × 1280 = 1,003,520: beta = sqrt(12,192,768 / 1,003,520)
    # = sqrt(12.15) = 3.4857; floor(4032 / 3.4857 / 28) = floor(41.31) = 41 → 1148, floor(3024 / 3.4857 / 28) =
    # floor(30.98) = 30 → 840: 41 × 30 = 1230 tokens (964,320 px, under the cap), 1232 with the markers.
    capped = vision.qwen2_vl_tokens(4032, 3024, max_pixels=vision.QWEN2_VL_PROCESSOR_MAX_PIXELS)
    assert vision.qwen2_vl_resize(4032, 3024, max_pixels=vision.QWEN2_VL_PROCESSOR_MAX_PIXELS) == (1148, 840)
    assert (capped.visual, capped.prompt) == (1230, 1232)
    # The released checkpoints allow 28² × 16384 = 12,845,056 px: the photo fits whole, 144 × 108 = 15,552 tokens.
    full = vision.qwen2_vl_tokens(4032, 3024)
    assert (full.visual, full.prompt) == (15552, 15554)


@pytest.mark.parametrize("size", [(1, 1), (27, 500), (640, 480), (1920, 1080), (3000, 17), (8000, 6000), (5000, 40)])
def test_qwen2_vl_resize_keeps_multiples_of_28_inside_the_pixel_bounds(size):
    for max_pixels in (vision.QWEN2_VL_PROCESSOR_MAX_PIXELS, vision.QWEN2_VL_CHECKPOINT_MAX_PIXELS):
        w, h = vision.qwen2_vl_resize(*size, max_pixels=max_pixels)
        assert w % 28 == 0 and h % 28 == 0 and w >= 28 and h >= 28
        assert vision.QWEN2_VL_MIN_PIXELS <= w * h <= max_pixels, (size, w, h)


def test_qwen2_vl_refuses_what_smart_resize_refuses():
    with pytest.raises(ValueError, match="200"):
        vision.qwen2_vl_resize(10_000, 10)
    with pytest.raises(ValueError, match="positive"):
        vision.qwen2_vl_resize(0, 10)


# ------------------------------------------------------------------------------------------------ MiniCPM-V 2.6


def test_minicpmv_tokens_worked_by_hand():
    # 448×448: area / 448² = 1 → ceil = 1 slice wanted, ≤ 1: the thumbnail alone. 64 queries in <image>…</image>
    # (66) after <image_id>0</image_id> (3): 69 prompt tokens, 64 visual.
    t = vision.minicpmv_tokens(448, 448)
    assert vision.minicpmv_grid(448, 448) is None
    assert (t.visual, t.prompt, t.layout) == (64, 69, "thumbnail only")
    # 1280×720: 921,600 / 200,704 = 4.59 → 5 wanted; grids of 4, 5 and 6 slices are tried against
    # log(1280/720) = 0.575: (3 cols, 2 rows) is off by |0.575 − log 1.5| = 0.170, better than (2, 2) at 0.575 and
    # (4, 1) at 0.811. Thumbnail + 6 slices = 7 × 64 = 448 visual; prompt 3 + 7 × 66 + 1 newline between the
    # two rows = 466.
    t = vision.minicpmv_tokens(1280, 720)
    assert vision.minicpmv_grid(1280, 720) == (3, 2)
    assert (t.visual, t.prompt) == (448, 466)
    assert vision.minicpmv_grid(720, 1280) == (2, 3)             # the same photo held upright


def test_minicpmv_tiny_and_huge_images():
    # 16×16: far below one 448² tile: the thumbnail (upscaled) alone, the same 64 / 69 tokens as 448×448.
    t = vision.minicpmv_tokens(16, 16)
    assert (t.visual, t.prompt) == (64, 69)
    # 4032×3024: 12,192,768 / 200,704 = 60.75 → capped at max_slice_nums 9; grids of 8 and 9 slices (10 is over
    # the cap): against log(4/3) = 0.288, (3, 3) is off by 0.288 and (4, 2) by 0.405 → 3 × 3. Visual
    # (1 + 9) × 64 = 640; prompt 3 + 10 × 66 + 2 newlines = 665.
    t = vision.minicpmv_tokens(4032, 3024)
    assert vision.minicpmv_grid(4032, 3024) == (3, 3)
    assert (t.visual, t.prompt) == (640, 665)
    # whatever the size, never more than (1 + 9) × 64 visual tokens
    assert max(vision.minicpmv_tokens(w, h).visual for w in (100, 900, 3000, 9000) for h in (100, 900, 3000)) == 640
    # the image id is one token per digit: image 12 costs one token more than image 0
    assert vision.minicpmv_tokens(448, 448, image_index=12).prompt == 70


# ------------------------------------------------------------------------------------------------ context and KV


def test_image_cost_uses_the_labs_kv_formula():
    cost = vision.image_cost("Qwen2-VL-7B", 1280, 720, n_ctx=8192)
    # Qwen2-VL-7B's language model: 28 layers, 4 KV heads of 128: 2 × 28 × 4 × 128 × 2 bytes = 57,344 B/token (f16)
    assert cost.kv_bytes == memory.kv_cache_bytes(28, 4, 128, 1198) == 57_344 * 1198
    assert cost.context_share == pytest.approx(1198 / 8192)
    # MiniCPM-V 2.6 runs the same Qwen2-7B language model: same bytes per token, fewer tokens per image
    mini = vision.image_cost("MiniCPM-V-2.6", 1280, 720, n_ctx=8192)
    assert mini.kv_bytes / mini.tokens.prompt == cost.kv_bytes / cost.tokens.prompt
    assert mini.kv_bytes == 57_344 * 466
    # a 12 MP photo at the checkpoint's settings does not fit an 8k context on Qwen2-VL; capped, it does
    assert vision.image_cost("Qwen2-VL-2B", 4032, 3024).context_share > 1
    assert vision.image_cost("Qwen2-VL-2B", 4032, 3024, max_pixels=vision.QWEN2_VL_PROCESSOR_MAX_PIXELS).tokens.prompt == 1232
    assert vision.image_cost("Qwen2-VL-2B", 448, 448, cache_type="q8_0").kv_bytes == memory.kv_cache_bytes(28, 2, 128, 258, "q8_0")
    with pytest.raises(ValueError, match="Qwen2-VL-2B"):
        vision.image_cost("llava", 448, 448)


def test_cost_table_has_a_row_per_model_and_size():
    rows = vision.cost_table(sizes=((448, 448), (1280, 720)), n_ctx=4096)
    assert len(rows) == 2 * len(vision.VISION_MODELS)
    row = next(r for r in rows if r["model"] == "MiniCPM-V-2.6" and r["image"] == "1280×720")
    assert row["prompt tokens"] == 466 and row["share of 4096"] == round(466 / 4096, 3)
    assert row["KV MiB (f16)"] == round(57_344 * 466 / 2**20, 1)


# ------------------------------------------------------------------------------------------------ a text-only server
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def chat(*parts) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": list(parts)}]}


async def echo_app(scope, receive, send):
    """Stands for the server's app: answers 200 with the body it read."""
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body or b"{}"})


@pytest.fixture
def guarded():
    from starlette.testclient import TestClient
    return TestClient(vision.RefuseMedia(echo_app, model="smollm2", hint="use a projector"))   # no lifespan: not entered


def test_an_image_part_is_refused_with_a_400_naming_what_is_missing(guarded):
    r = guarded.post("/v1/chat/completions", json=chat({"type": "text", "text": "What is this?"},
                                                        {"type": "image_url", "image_url": {"url": PNG}}))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "smollm2 does not support images: it is a text-only model (use a projector)"
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages[1].content[1]")
    r = guarded.post("/v1/chat/completions", json=chat({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}))
    assert r.status_code == 400 and r.json()["error"]["message"] == "smollm2 does not support audio: it is a text-only model"


def test_everything_else_reaches_the_app_unchanged(guarded):
    text_only = chat({"type": "text", "text": "Hi"})
    r = guarded.post("/v1/chat/completions", json=text_only)
    assert r.status_code == 200 and r.json() == text_only                 # the body the app read is the one sent
    assert guarded.post("/v1/chat/completions", content=b"not json").content == b"not json"    # the app's own 4xx/5xx
    image = chat({"type": "image_url", "image_url": {"url": PNG}})
    assert guarded.post("/v1/completions", json=image).status_code == 200  # not a chat route: not this check's
    assert guarded.get("/v1/models").status_code == 200
    assert vision.media_refusal(json.dumps({"messages": "hi"}).encode()) is None


def test_the_guard_goes_into_llama_cpp_pythons_app_unless_a_projector_is_loaded(monkeypatch):
    import llama_cpp.server.app as server_app
    from starlette.applications import Starlette

    monkeypatch.setattr(server_app, "create_app", lambda **kw: Starlette())
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    untouched = server_app.create_app
    assert vision.guard_llama_cpp_server(["--model", "m.gguf", "--clip_model_path", "mmproj.gguf"]) is False
    assert vision.guard_llama_cpp_server(["--config_file=models.yaml"]) is False
    assert server_app.create_app is untouched
    assert vision.guard_llama_cpp_server(["--model", "m.gguf", "--model_alias", "smollm2"]) is True
    app = server_app.create_app()
    guard = app.user_middleware[-1]
    assert guard.cls is vision.RefuseMedia and guard.kwargs["model"] == "smollm2"
    assert "--clip_model_path" in guard.kwargs["hint"]
