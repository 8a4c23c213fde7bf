"""LLaVA in the engine against the oracle (transformers LlavaForConditionalGeneration, float32):
image preprocessing and placeholder expansion, greedy tokens and logits, batching, chunked
prefill across an image, prefix caching keyed by image content, the E -> P -> D chain, and
typed errors for bad image input."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from shared.engine import EngineConfig, LLMEngine
from shared.engine.errors import InvalidRequestError
from shared.engine.multimodal import (
    ImageFeatures,
    ImageProcessor,
    content_hash,
    expand_image_tokens,
)
from shared.engine.sampling_params import SamplingParams

IMAGE_TOKENS = 16  # (32 // 8) ** 2 patches; the CLS row is dropped ("default" strategy)
USER, END = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    noise = Image.fromarray(torch.randint(0, 256, (45, 33, 3), generator=g, dtype=torch.uint8).numpy())
    rgba = Image.new("RGBA", (40, 40), (10, 120, 240, 128))
    return [Image.new("RGB", (48, 40), (200, 30, 30)),
            Image.linear_gradient("L").convert("RGB").resize((70, 50)), noise, rgba]


IMAGES = _images()
PROMPTS = {  # text, images: one image; three at the start, middle and end of the prompt
    "one": (USER + "<image>What is in this picture?" + END, IMAGES[:1]),
    "three": (USER + "<image>Compare the first, <image> the second and the third: <image>" + END,
              IMAGES[1:4]),
}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_llava(tiny_llava):
    def make(**overrides) -> LLMEngine:
        kw = dict(num_kv_blocks=64, num_threads=2, block_size=16) | overrides
        return LLMEngine(EngineConfig(model=tiny_llava.path, **kw))

    return make


def _ids(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_preprocessing_expansion_and_hashes_match_transformers(tiny_llava, make_llava):
    e = make_llava()
    text, images = PROMPTS["three"]
    ref = tiny_llava.inputs(text, images)
    ids, ranges = expand_image_tokens(_ids(e, text), tiny_llava.image_token_id, [IMAGE_TOKENS] * 3)
    assert ids == ref["input_ids"][0].tolist()
    assert [n for _, n in ranges] == [IMAGE_TOKENS] * 3 and ranges[0][0] == len(_ids(e, USER))
    pixels = ImageProcessor.from_folder(tiny_llava.path)(images)["pixel_values"]
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=0, rtol=0)  # RGBA composited as HF
    bmp = io.BytesIO()
    IMAGES[0].save(bmp, format="BMP")
    assert content_hash(IMAGES[0]) == content_hash(_png(IMAGES[0])) == content_hash(bmp.getvalue())
    assert len({content_hash(im) for im in IMAGES}) == len(IMAGES)


def test_encode_images_matches_transformers_and_caches(tiny_llava, make_llava):
    e = make_llava()
    feats = e.encode_images([_png(IMAGES[0]), *IMAGES[1:3]])
    with torch.no_grad():
        pv = tiny_llava.processor.image_processor(IMAGES[:3], return_tensors="pt")["pixel_values"]
        ref = tiny_llava.hf.model.get_image_features(pixel_values=pv).pooler_output
    assert [f.embeds.shape for f in feats] == [(IMAGE_TOKENS, 64)] * 3
    for f, r in zip(feats, ref, strict=True):
        torch.testing.assert_close(f.embeds, r, atol=1e-5, rtol=1e-5)
    assert e.stats()["mm_cache_misses"] == 3 and e.stats()["mm_cache_hits"] == 0
    again = e.encode_images([IMAGES[1], IMAGES[0], IMAGES[1]])  # all cached, order kept
    assert [f.hash for f in again] == [feats[1].hash, feats[0].hash, feats[1].hash]
    assert e.stats()["mm_cache_misses"] == 3 and e.stats()["mm_cache_hits"] == 3
    pix = e.encode_images([pv[2]])  # a preprocessed pixel tensor
    torch.testing.assert_close(pix[0].embeds, ref[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_greedy_and_logits_match_transformers(case, tiny_llava, make_llava, all_free):
    text, images = PROMPTS[case]
    ref_ids, ref_toks = tiny_llava.greedy(text, images, 10)
    e = make_llava()
    e.runner.capture_logits = True
    e.add_request("a", _ids(e, text), greedy(10), images=images)
    rows, toks, outs = [], [], []
    while e.has_unfinished():
        for o in e.step():
            rows.append(e.runner.last_logits[0].clone())
            toks += o.new_token_ids
            outs.append(o)
        e.check_integrity()
    assert toks == ref_toks and outs[0].num_prompt_tokens == len(ref_ids)
    ref = tiny_llava.logits(ref_ids + toks, images, len(ref_ids) - 1, 10)
    torch.testing.assert_close(torch.stack(rows), ref, atol=1e-4, rtol=1e-4)
    all_free(e)


def test_mixed_batch_chunked_prefill_splits_images(tiny_llava, make_llava, drain, all_free):
    """A 7-token budget and 4-token blocks cut every image's placeholder range across steps and
    blocks; a text-only request and an n=2 image request run in the same batches."""
    e = make_llava(max_num_batched_tokens=7, block_size=4)
    text_only = USER + "Tell me a story about the sea." + END
    reqs = {"one": (*PROMPTS["one"], 8), "three": (*PROMPTS["three"], 6), "text": (text_only, [], 9)}
    for rid, (text, images, n) in reqs.items():
        e.add_request(rid, _ids(e, text), greedy(n, n=2 if rid == "one" else 1), images=images or None)
    res = drain(e)
    for rid, (text, images, n) in reqs.items():
        assert res[(rid, 0)].tokens == tiny_llava.greedy(text, images, n)[1], rid
    assert res[("one", 1)].tokens == res[("one", 0)].tokens
    all_free(e)


def test_prefix_cache_is_keyed_by_image_content(tiny_llava, make_llava, drain, all_free):
    e = make_llava()
    text, images = PROMPTS["one"]
    longer = text + "Answer in one word."
    e.add_request("a", _ids(e, text), greedy(4), images=images)
    assert drain(e)[("a", 0)].num_cached_tokens == 0
    e.add_request("same", _ids(e, longer), greedy(6), images=[_png(images[0])])  # same pixels
    res = drain(e)[("same", 0)]
    assert res.num_cached_tokens >= 16 and res.tokens == tiny_llava.greedy(longer, images, 6)[1]
    e.add_request("other", _ids(e, text), greedy(6), images=IMAGES[1:2])  # same tokens
    res = drain(e)[("other", 0)]
    assert res.num_cached_tokens == 0
    assert res.tokens == tiny_llava.greedy(text, IMAGES[1:2], 6)[1]
    all_free(e)


def test_encode_prefill_decode_chain(tiny_llava, make_llava, drain, all_free):
    """E (encode_images) -> P (prefill_only with the features) -> export_kv -> D (import_kv),
    and D recomputing from the features alone (kv=None)."""
    text, images = PROMPTS["three"]
    ref_ids, ref_toks = tiny_llava.greedy(text, images, 8)
    enc, pre, dec, rec = make_llava(), make_llava(max_num_batched_tokens=16), make_llava(), make_llava()
    feats = [ImageFeatures(f.hash, f.embeds.clone()) for f in enc.encode_images(images)]  # "wire"
    prompt = _ids(pre, text)
    pre.add_request("r", prompt, greedy(8), mm_inputs=feats, prefill_only=True)
    first = []
    while not first:
        first = pre.step()
        pre.check_integrity()
    (first,) = first
    assert first.new_token_ids == ref_toks[:1] and first.num_prompt_tokens == len(ref_ids)
    kv = pre.export_kv("r")
    pre.release("r")
    all_free(pre)
    with pytest.raises(InvalidRequestError) as info:  # other image, same tokens: other blocks
        dec.import_kv("x", prompt, first.new_token_ids, greedy(8), kv, seed=0,
                      mm_inputs=[feats[0], feats[2], feats[1]])
    assert info.value.param == "kv"
    dec.import_kv("r", prompt, first.new_token_ids, greedy(8), kv, seed=0, mm_inputs=feats)
    assert first.new_token_ids + drain(dec)[("r", 0)].tokens == ref_toks
    rec.import_kv("r", ref_ids, first.new_token_ids, greedy(8), None, seed=0, mm_inputs=feats)  # expanded
    assert first.new_token_ids + drain(rec)[("r", 0)].tokens == ref_toks
    for engine in (dec, rec):
        all_free(engine)


def test_typed_errors_for_bad_image_input(tiny_llava, make_llava, make_engine, all_free):
    e = make_llava(max_images_per_request=3)
    one, three = (_ids(e, PROMPTS[k][0]) for k in ("one", "three"))
    feat = e.encode_images(IMAGES[:1])[0]
    cases = [
        (one, dict(images=IMAGES[:2]), "image"),                  # 1 <image>, 2 images
        (three, dict(images=IMAGES[:1]), "image"),                # 3 <image>, 1 image
        (one, dict(images=[b"\x89PNG\r\n\x1a\n not really"]), "image"),
        (one, dict(images=[Image.new("RGB", (0, 0))]), "image"),
        (one, dict(images=["a string"]), "image"),
        (one * 4, dict(images=IMAGES[:1] * 4), "image"),          # over max_images_per_request
        (one, {}, "image"),                                       # image tokens, no images
        (one, dict(images=IMAGES[:1], mm_inputs=[feat]), "image"),
        (one, dict(mm_inputs=[ImageFeatures("h", torch.zeros(16, 8))]), "mm_inputs"),
    ]
    for i, (prompt, kw, param) in enumerate(cases):
        with pytest.raises(InvalidRequestError) as info:
            e.add_request(f"bad{i}", prompt, greedy(4), **kw)
        assert info.value.param == param, (i, info.value)
    with pytest.raises(InvalidRequestError, match="decode"):
        e.encode_images([b"garbage"])
    text = make_engine("llama")
    with pytest.raises(InvalidRequestError) as info:
        text.add_request("t", [5, 6, 7], greedy(4), images=IMAGES[:1])
    assert info.value.param == "image"
    with pytest.raises(InvalidRequestError):
        text.encode_images(IMAGES[:1])
    all_free(e)
    all_free(text)


def test_loads_the_transformers_checkpoint_layout(tiny_llava, tmp_path, make_llava, drain):
    """Checkpoints saved by recent transformers (`model.language_model.`, `lm_head.`,
    `model.vision_tower.vision_model.`, ...) load to the same model."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llava-new-layout"
    shutil.copytree(tiny_llava.path, folder)
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_model."),
               ("multi_modal_projector.", "model.multi_modal_projector.")]
    state = load_file(folder / "model.safetensors")
    new = {}
    for k, t in state.items():
        src, dst = next((s, d) for s, d in renames if k.startswith(s))
        new[dst + k[len(src):]] = t
    save_file(new, folder / "model.safetensors", metadata={"format": "pt"})
    text, images = PROMPTS["one"]
    outs = []
    for path in (tiny_llava.path, str(folder)):
        e = LLMEngine(EngineConfig(model=path, num_kv_blocks=32, num_threads=2))
        e.add_request("a", _ids(e, text), greedy(6), images=images)
        outs.append(drain(e)[("a", 0)].tokens)
    assert outs[0] == outs[1] == tiny_llava.greedy(text, images, 6)[1]


def test_weight_name_mapping():
    from shared.engine.models.llava import LlavaForConditionalGeneration as Llava

    m = Llava.map_weight_name
    for name in ("language_model.model.layers.0.self_attn.k_proj.weight",
                 "model.language_model.layers.0.self_attn.k_proj.weight"):
        assert m(name, False) == ("language_model.model.layers.0.self_attn.qkv_proj.weight", 1, 3)
    assert m("lm_head.weight", False) == m("language_model.lm_head.weight", False) == (
        "language_model.lm_head.weight", 0, 1)
    assert m("lm_head.weight", True) is None and m("language_model.lm_head.weight", True) is None
    assert m("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", False) == (
        "vision_tower.encoder.layers.0.mlp.fc1.bias", 0, 1)
    assert m("model.vision_tower.vision_model.embeddings.position_ids", False) is None
    assert m("model.multi_modal_projector.linear_2.weight", False) == (
        "multi_modal_projector.linear_2.weight", 0, 1)
