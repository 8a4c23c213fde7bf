"""Load a local HuggingFace model folder onto the configured device and dtype.

The module tree is built on the meta device (no memory), each checkpoint tensor is read from
safetensors, cast, moved to the device and fused where our layout fuses (q/k/v, gate/up),
then assigned in place of the meta parameters: peak memory is about one copy of the weights.
Never touches the network.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from shared.engine.errors import EngineError
from shared.engine.models.registry import resolve_model_class


class ModelLoadError(EngineError):
    """The model folder is missing, incomplete or does not match its config."""

    code = "model_load_error"


def load_hf_config(folder: str | Path):
    """The transformers config object of a local model folder (ModelLoadError if unusable)."""
    path = Path(folder)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from exc


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"bad {index}: {exc}") from exc
        files = [path / n for n in names]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ModelLoadError(f"model folder {str(path)!r} has no model.safetensors(.index.json)")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"missing weight shard {f}")
    return files


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device, max_len: int,
               hf_config=None, weight_quant: str = "none") -> torch.nn.Module:
    """Build the registered model class for the folder and load its weights (eval, no grad);
    `weight_quant` != "none" then quantizes the linear layers (shared.engine.quant).

    Raises ModelLoadError (missing files, missing/unexpected/mis-shaped tensors) or
    UnsupportedModelError (unknown architecture)."""
    from safetensors import safe_open

    path = Path(folder)
    cfg = hf_config if hf_config is not None else load_hf_config(path)
    cls = resolve_model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg)
    tied = bool(getattr(model, "tie_word_embeddings", False))
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}

    state: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                mapped = cls.map_weight_name(name, tied)
                if mapped is None:
                    continue
                target, idx, count = mapped
                t = f.get_tensor(name).to(device=device, dtype=dtype)
                if count == 1:
                    state[target] = t
                    continue
                shards[target][idx] = t
                if len(shards[target]) == count:
                    parts = shards.pop(target)
                    state[target] = torch.cat([parts[i] for i in range(count)], dim=0)

    problems = []
    if shards:
        problems.append(f"incomplete fused weights {sorted(shards)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, t in state.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(t.shape)}, model expects {tuple(expected[k].shape)}")
    if problems:
        raise ModelLoadError(f"weights in {str(path)!r} do not match {cls.__name__}: " + "; ".join(problems))

    model.load_state_dict(state, strict=False, assign=True)
    model.requires_grad_(False)
    model.init_runtime(max_len, dtype, device)
    if weight_quant != "none":
        from shared.engine.quant import quantize_model

        quantize_model(model, weight_quant)
    return model.eval()
