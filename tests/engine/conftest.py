"""Engine test fixtures: tiny random HF models built locally (no downloads) and helpers.

    tiny          session TinyModels: .path(name) -> HF folder, .hf(name) -> transformers model
    tiny_with_tokenizer  session folder of a tiny llama with tokenizer.json (make_tiny)
    make_engine   factory: make_engine(name, **EngineConfig overrides) -> LLMEngine (ids only)
    drain         drain(engine, check=True, steps=None, results=None) -> {(request_id,
                  seq_index): Result}; runs step() until idle, checking integrity every step
    hf_greedy     hf_greedy(name, prompt, n) -> transformers greedy continuation (the oracle)
    prompt        prompt(length, seed) -> random token ids
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

torch.set_num_threads(2)

VOCAB = 512
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
# name -> (family, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 128}}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "llama_eos": ("llama", {"eos_token_id": 7}),
}


class TinyModels:
    def __init__(self, root):
        self.root = root
        self._paths: dict[str, str] = {}
        self._hf: dict[str, torch.nn.Module] = {}

    def path(self, name: str) -> str:
        if name not in self._paths:
            from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

            family, over = VARIANTS[name]
            cfg_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if family == "llama"
                                  else (Qwen2Config, Qwen2ForCausalLM))
            arch = "LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"
            cfg = cfg_cls(architectures=[arch], **{**_BASE, **over})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                model = model_cls(cfg).float().eval()
                with torch.no_grad():  # HF zero-inits biases: make them matter
                    for n, p in model.named_parameters():
                        if n.endswith("bias"):
                            p.normal_(0, 0.2)
            out = self.root / name
            model.save_pretrained(out, safe_serialization=True)
            self._paths[name] = str(out)
        return self._paths[name]

    def hf(self, name: str) -> torch.nn.Module:
        if name not in self._hf:
            from transformers import AutoModelForCausalLM

            self._hf[name] = AutoModelForCausalLM.from_pretrained(self.path(name), dtype=torch.float32).eval()
        return self._hf[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory) -> str:
    """A tiny llama folder with a real (byte-level BPE) tokenizer, from `epd model make-tiny`."""
    from shared.engine.tiny import make_tiny

    return str(make_tiny("llama", tmp_path_factory.mktemp("tiny-tok") / "llama"))


@pytest.fixture
def make_engine(tiny):
    from shared.engine import EngineConfig, LLMEngine

    def make(name: str = "llama", **overrides):
        kw = dict(num_kv_blocks=128, num_threads=2, block_size=16)
        kw.update(overrides)
        return LLMEngine(EngineConfig(model=tiny.path(name), **kw), tokenizer=False)

    return make


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    outputs: list = field(default_factory=list)
    start_index: int = 0  # token_index of the first output seen (1 after import_kv)


def run_until_idle(engine, check: bool = True, max_steps: int = 10_000, *, steps: int | None = None,
                   results: dict | None = None) -> dict[tuple[str, int], Result]:
    """Step until idle (or `steps` steps), accumulating into `results` (continue a run)."""
    results = {} if results is None else results
    for i in range(max_steps):
        if not engine.has_unfinished() or i == steps:
            break
        for o in engine.step():
            r = results.setdefault((o.request_id, o.seq_index), Result(start_index=o.token_index))
            assert o.token_index == r.start_index + len(r.tokens), "token index gap"
            r.tokens += o.new_token_ids
            r.outputs.append(o)
            r.num_cached_tokens = max(r.num_cached_tokens, o.num_cached_tokens)
            if o.finished:
                assert r.finish_reason is None, "output after finish"
                r.finish_reason = o.finish_reason
        if check:
            engine.check_integrity()
    else:
        raise AssertionError("engine did not become idle")
    return results


@pytest.fixture
def drain():
    return run_until_idle


@pytest.fixture
def hf_greedy(tiny):
    def ref(name: str, prompt: list[int], n: int) -> list[int]:
        model = tiny.hf(name)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return ref


@pytest.fixture
def check_logits(tiny):
    """check_logits(engine, name, prompt, n): run greedy with logits captured and compare every
    step's logits with transformers' (float32, atol = rtol = 1e-4)."""
    from shared.engine.sampling_params import SamplingParams

    def check(engine, name: str, prompt: list[int], n: int) -> None:
        engine.runner.capture_logits = True
        engine.add_request("logits", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        rows, toks = [], []
        while engine.has_unfinished():
            outs = engine.step()
            rows.append(engine.runner.last_logits[0].float().cpu())
            toks += outs[0].new_token_ids
        with torch.no_grad():
            ref = tiny.hf(name)(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1: len(prompt) + n - 1]
        torch.testing.assert_close(torch.stack(rows), ref.float(), atol=1e-4, rtol=1e-4)

    return check


@pytest.fixture
def prompt():
    def make(length: int, seed: int = 0) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(8, VOCAB, (length,), generator=g).tolist()

    return make


def assert_all_free(engine) -> None:
    """Every block is free or cached-free and the engine holds no request."""
    engine.check_integrity()
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == engine.num_kv_blocks, engine.stats()
    assert not engine._groups, list(engine._groups)


@pytest.fixture
def all_free():
    return assert_all_free


class LlavaOracle:
    """The tiny LLaVA folder and its transformers reference (float32, PIL processor).

    inputs(text, images) -> processor outputs (`<image>` expanded); greedy(text, images, n) ->
    (expanded prompt ids, generate(do_sample=False) tokens); logits(ids, images, start, n) ->
    float32 logits at positions [start, start + n) of the prompt `ids` fed with `images`."""

    def __init__(self, path: str):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.path = path
        self.processor = AutoProcessor.from_pretrained(path, backend="pil")
        self.hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.image_token_id = self.hf.config.image_token_id

    def inputs(self, text: str, images: list):
        return self.processor(images=images or None, text=text, return_tensors="pt")

    def greedy(self, text: str, images: list, n: int) -> tuple[list[int], list[int]]:
        inputs = self.inputs(text, images)
        with torch.no_grad():
            out = self.hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        ids = inputs["input_ids"][0].tolist()
        return ids, out[0, len(ids):].tolist()

    def logits(self, ids: list[int], images: list, start: int, n: int) -> torch.Tensor:
        kw = {"pixel_values": self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
              } if images else {}
        with torch.no_grad():
            out = self.hf(input_ids=torch.tensor([ids]), **kw)
        return out.logits[0, start:start + n].float()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> LlavaOracle:
    """make_tiny("llava") built once per session, with its transformers oracle."""
    from shared.engine.tiny import make_tiny

    return LlavaOracle(str(make_tiny("llava", tmp_path_factory.mktemp("tiny-llava") / "llava")))
