"""Images on the engine side: decode, hash, preprocess, place in prompts (+ image_encoder.py).

    image (bytes | PIL | pixel tensor [3, H, W])
      -> load_image: decoded RGB (transparency composited on white, as transformers does)
      -> content_hash: sha256 of the RGB pixels + size       (the image's name everywhere:
         LRU key here, MMInput.hash, hence the KV block hashes on every worker and tier)
      -> ImageProcessor (the folder's transformers processor, PIL backend) -> pixel_values
      -> model.encode_images(**pixel inputs)   (image_encoder.py: batching, LRU by hash)
      -> ImageFeatures(hash, embeds [n_tokens, hidden])      (E -> P / D hand-off unit)
      -> place_images(prompt, image_token_id, features) -> expanded prompt + MMInput ranges

Token counts are never assumed: each image contributes `embeds.shape[0]` placeholders (the
same for every LLaVA image, not for Qwen2-VL). Bad input raises InvalidRequestError with
param="image" (param="mm_inputs" for malformed precomputed inputs).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.engine.errors import InvalidRequestError
from shared.engine.sequence import MMInput


@dataclass
class ImageFeatures:
    """One encoded image: what the E stage hands to P (and to D, which recomputes with it
    after a failed K/V import or a preemption). `embeds`: `[n_tokens, hidden]` tensor."""

    hash: str
    embeds: Any

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


MMInputs = list[MMInput] | list[ImageFeatures]  # positioned inputs, or features to place


def bad_image(msg: str) -> InvalidRequestError:
    """InvalidRequestError(param="image")."""
    return InvalidRequestError(msg, param="image")


def is_tensor(x) -> bool:
    """True for a torch.Tensor (torch imported lazily)."""
    import torch

    return isinstance(x, torch.Tensor)


def load_image(image):
    """bytes / PIL image -> RGB PIL image. Raises InvalidRequestError(param="image") for
    undecodable bytes, zero-size images and other types."""
    from PIL import Image

    if not isinstance(image, (bytes, bytearray, memoryview, Image.Image)):
        raise bad_image(f"an image must be bytes, a PIL image or a pixel tensor, not {type(image).__name__}")
    try:
        img = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(bytes(image)))
        img.load()
        if img.width <= 0 or img.height <= 0:
            raise bad_image(f"image has zero size {img.width}x{img.height}")
        if img.mode == "RGB":
            return img
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except InvalidRequestError:
        raise
    except Exception as exc:  # any decoder failure (corrupt, truncated, bomb) is bad input
        raise bad_image(f"cannot decode image: {exc}") from exc


def content_hash(image) -> str:
    """Stable hex name of an image's content: sha256 of its decoded RGB pixels and size (so
    the same pixels in another file format hash the same); pixel tensors hash dtype, shape
    and bytes. Raises like load_image."""
    if is_tensor(image):
        import torch

        t = image.detach().cpu().contiguous()
        h = hashlib.sha256()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    return rgb_hash(load_image(image))


def rgb_hash(rgb) -> str:
    """sha256 hex of an RGB PIL image's size and pixels: `content_hash` of a decoded image,
    without importing torch (the gateway names images with it)."""
    h = hashlib.sha256(f"rgb:{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def expand_image_tokens(token_ids: list[int], image_token_id: int,
                        tokens_per_image: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Replace the k-th `image_token_id` by tokens_per_image[k] copies of it (what
    LlavaProcessor does to the text). Returns (ids, [(offset, length)] per image). ValueError
    when the prompt's image token count differs from len(tokens_per_image)."""
    n_found = sum(1 for t in token_ids if t == image_token_id)
    if n_found != len(tokens_per_image):
        raise ValueError(f"{n_found} image tokens for {len(tokens_per_image)} images")
    ids: list[int] = []
    ranges: list[tuple[int, int]] = []
    for t in token_ids:
        if t != image_token_id:
            ids.append(t)
            continue
        ranges.append((len(ids), tokens_per_image[len(ranges)]))
        ids.extend([t] * ranges[-1][1])
    return ids, ranges


def place_images(prompt: list[int], image_token_id: int,
                 features: list[ImageFeatures]) -> tuple[list[int], list[MMInput]]:
    """Prompt with one image token per image (expanded here) or already expanded (one token
    per feature row, each image's run contiguous) -> (prompt ids, MMInputs in prompt order).
    Raises InvalidRequestError(param="image") when the counts match neither form."""
    lengths = [f.num_tokens for f in features]
    where = [i for i, t in enumerate(prompt) if t == image_token_id]
    if len(where) == len(features):
        ids, ranges = expand_image_tokens(prompt, image_token_id, lengths)
    elif len(where) == sum(lengths):
        ids, ranges, k = list(prompt), [], 0
        for n in lengths:
            if where[k + n - 1] - where[k] != n - 1:
                raise bad_image(f"the placeholder tokens of image {len(ranges)} are not contiguous")
            ranges.append((where[k], n))
            k += n
    else:
        raise bad_image(f"the prompt has {len(where)} image tokens for {len(features)} images "
                   f"(expected {len(features)}, or {sum(lengths)} when already expanded)")
    return ids, [MMInput(f.hash, off, n, f.embeds) for f, (off, n) in zip(features, ranges, strict=True)]


def check_mm_inputs(mm_inputs: list[MMInput], prompt_len: int, hidden: int) -> None:
    """Positioned inputs must lie inside the prompt, not overlap, and carry embeds
    `[length, hidden]`; InvalidRequestError(param="mm_inputs") otherwise."""
    end = 0
    for mm in sorted(mm_inputs, key=lambda m: m.offset):
        if not (isinstance(mm, MMInput) and isinstance(mm.hash, str) and mm.hash and mm.length > 0
                and end <= mm.offset and mm.end <= prompt_len and mm.embeds is not None
                and tuple(mm.embeds.shape) == (mm.length, hidden)):
            raise InvalidRequestError("mm_inputs must lie inside the prompt without overlapping, "
                                      "with a hash and embeds [length, hidden]", param="mm_inputs")
        end = mm.end


class ImageProcessor:
    """The model folder's transformers image processor (PIL backend, no torchvision):
    RGB PIL images -> the model's pixel inputs (`{"pixel_values": [N, 3, H, W]}` for LLaVA)."""

    def __init__(self, hf_processor):
        self.hf = hf_processor

    @classmethod
    def from_folder(cls, path: str | Path) -> ImageProcessor:
        """Read preprocessor_config.json (or processor_config.json). Raises FileNotFoundError
        when the folder has neither, ValueError when transformers cannot build it."""
        folder = Path(path)
        if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
            raise FileNotFoundError(f"no preprocessor_config.json in {folder}")
        from transformers import AutoImageProcessor

        return cls(AutoImageProcessor.from_pretrained(str(folder), backend="pil", local_files_only=True))

    def __call__(self, images: list) -> dict:
        return dict(self.hf(images=images, return_tensors="pt"))


def admit(encoder, prompt: list[int], images, mm_inputs,
          hidden: int) -> tuple[list[int], list[MMInput]]:
    """The multimodal part of add_request / import_kv -> (prompt ids, positioned MMInputs).
    `encoder`: the engine's ImageEncoder (None for a text-only model).

    `images` (raw, encoded here) or `mm_inputs`: a list of ImageFeatures (from an E worker;
    placed at the prompt's image tokens, expanded or not) or of MMInputs (already positioned;
    also accepted by text models). A multimodal model rejects image tokens without images."""
    if images is not None and not isinstance(images, (list, tuple)):
        raise bad_image("images must be a list")
    if mm_inputs is not None and not isinstance(mm_inputs, (list, tuple)):
        raise InvalidRequestError("mm_inputs must be a list", param="mm_inputs")
    if images and mm_inputs:
        raise bad_image("send images or mm_inputs, not both")
    if not images and not mm_inputs:
        if encoder is not None and encoder.image_token_id in prompt:
            raise bad_image("the prompt has image tokens but the request has no images")
        return list(prompt), []
    if mm_inputs and all(isinstance(m, MMInput) for m in mm_inputs):
        check_mm_inputs(mm_inputs, len(prompt), hidden)
        return list(prompt), sorted(mm_inputs, key=lambda m: m.offset)
    if encoder is None:
        raise bad_image("this model does not accept images")
    if images:
        features = encoder.encode(images)
    else:
        encoder.check_count(len(mm_inputs))
        for f in mm_inputs:
            if not (isinstance(f, ImageFeatures) and isinstance(f.hash, str) and f.hash
                    and getattr(f.embeds, "ndim", 0) == 2 and f.embeds.shape[0] > 0
                    and f.embeds.shape[1] == hidden):
                raise InvalidRequestError("mm_inputs must all be MMInput or all ImageFeatures with "
                                          "a hash and embeds [n_tokens, hidden]", param="mm_inputs")
        features = list(mm_inputs)
    return place_images(prompt, encoder.image_token_id, features)
