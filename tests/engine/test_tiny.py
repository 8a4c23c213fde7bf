"""make_tiny: folders load offline in transformers, are deterministic, and fit our engine's needs."""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.engine.modelfiles import MARKER_NAME  # noqa: E402
from shared.engine.tiny import TINY_ARCHS, make_tiny  # noqa: E402

IMAGE_TOKENS = 16  # (32 // 8) ** 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch, seed=0) for arch in TINY_ARCHS}


def _load(path, arch):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    cls = LlavaForConditionalGeneration if arch == "llava" else AutoModelForCausalLM
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _images():
    from PIL import Image

    red = Image.new("RGB", (48, 40), (200, 30, 30))
    gradient = Image.linear_gradient("L").convert("RGB").resize((70, 50))
    return [red, gradient]


def _greedy(model, inputs, n=12):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _text_inputs(length=20, seed=0):
    ids = torch.randint(4, 512, (1, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_builds_and_loads(folders, arch):
    model = _load(folders[arch], arch)
    text = model.config.get_text_config()
    assert text.vocab_size == 512 and text.num_hidden_layers == 4
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == [0, 2]
    assert (folders[arch] / "model.safetensors").is_file()
    if arch == "qwen2":
        assert text.tie_word_embeddings
        assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_same_bytes_and_tokens(folders, tmp_path, arch):
    again = make_tiny(arch, tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (folders[arch] / name).read_bytes(), name
    other = make_tiny(arch, tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()

    inputs = _text_inputs()
    first = _greedy(_load(folders[arch], arch), inputs)
    assert first == _greedy(_load(again, arch), inputs)
    assert len(first) == 12


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tokenizer_round_trip_and_chat_template(folders, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[arch])
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0
    for text in ["The capital of France is Paris.", "x = 3.14159; naïve café 日本語 🤖\n\t end"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i >= 4 for i in ids)  # no special token out of plain text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2
    image_message = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    if arch == "llava":
        assert tok.convert_tokens_to_ids("<image>") == 3
        assert tok.apply_chat_template(image_message, tokenize=False) == (
            "<|im_start|>user\n<image>?<|im_end|>\n"
        )
    else:
        with pytest.raises(Exception, match="does not accept images"):
            tok.apply_chat_template(image_message, tokenize=False)


@pytest.mark.parametrize("n_images", [1, 2])
def test_llava_processor_expands_to_feature_count(folders, n_images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folders["llava"])
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    model = _load(folders["llava"], "llava")
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}] * n_images
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(images=_images()[:n_images], text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape == (n_images, 3, 32, 32)
    n_placeholders = int((inputs["input_ids"] == model.config.image_token_index).sum())
    features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert [f.shape[0] for f in features] == [IMAGE_TOKENS] * n_images
    assert n_placeholders == IMAGE_TOKENS * n_images
    tokens = _greedy(model, inputs)
    assert tokens == _greedy(model, inputs) and len(tokens) == 12


def test_top2_logit_gap_is_wide(folders):
    """Greedy steps on random prompts: near-ties (< 1e-3) must be rare for a stable oracle."""
    model = _load(folders["llama"], "llama")
    gaps = []
    for seed in range(8):
        inputs = _text_inputs(length=5 + 7 * seed, seed=seed)
        out = model.generate(
            **inputs, max_new_tokens=16, do_sample=False, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        gaps += [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    print(
        f"top-2 gap over {len(gaps)} steps: min={min(gaps):.2e} median={statistics.median(gaps):.3f}"
    )
    assert statistics.median(gaps) > 0.05
    assert sum(g < 1e-3 for g in gaps) <= len(gaps) * 0.02


def test_second_call_is_a_noop(folders):
    before = (folders["llama"] / MARKER_NAME).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert make_tiny("llama", folders["llama"], seed=0) == folders["llama"]
    assert time.perf_counter() - t0 < 0.5
    assert (folders["llama"] / MARKER_NAME).stat().st_mtime_ns == before


def test_bad_arch_and_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny("gpt2", tmp_path / "x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_tiny("llama", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_overrides_reach_the_config(tmp_path):
    from transformers import AutoConfig

    path = make_tiny("llama", tmp_path / "l2", num_hidden_layers=2, eos_token_id=7)
    config = AutoConfig.from_pretrained(path)
    assert config.num_hidden_layers == 2 and config.eos_token_id == 7
