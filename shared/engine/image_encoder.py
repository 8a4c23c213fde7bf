"""The E stage inside one engine: images -> ImageFeatures, with an LRU of embeds by content.

    images (bytes | PIL | pixel tensor) -> load_image + content_hash (multimodal.py)
      -> cache hit: the stored embeds        (repeats within one call are encoded once)
      -> miss: ImageProcessor -> model.encode_images, `max_batch` images per tower forward
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from shared.engine.multimodal import (
    ImageFeatures,
    ImageProcessor,
    bad_image,
    content_hash,
    is_tensor,
    load_image,
)


class FeatureCache:
    """LRU of image embeds by content hash, bounded in bytes (an entry over budget is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._d: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str):
        t = self._d.get(key)
        if t is not None:
            self._d.move_to_end(key)
        return t

    def put(self, key: str, t) -> None:
        size = t.numel() * t.element_size()
        if key in self._d or size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._d[key], self.nbytes = t, self.nbytes + size


class ImageEncoder:
    """The E stage of one engine: images -> ImageFeatures, batched over the vision tower
    (`max_batch` images per forward), repeated images served from a FeatureCache."""

    def __init__(self, model, processor: ImageProcessor | None, *, max_images: int, cache_bytes: int,
                 max_batch: int = 16):
        self.model, self.processor = model, processor
        self.image_token_id: int = model.image_token_id
        self.max_images, self.max_batch = max_images, max_batch
        self.cache = FeatureCache(cache_bytes)
        self.hits = self.misses = 0

    @classmethod
    def for_model(cls, model, config) -> ImageEncoder | None:
        """The encoder of an engine's model (None for a text-only model); the folder's image
        processor when it has one (without: pixel tensors and precomputed features only)."""
        if not hasattr(model, "encode_images"):
            return None
        try:
            processor = ImageProcessor.from_folder(config.model)
        except FileNotFoundError:
            processor = None
        return cls(model, processor, max_images=config.max_images_per_request,
                   cache_bytes=int(config.mm_cache_gb * (1 << 30)))

    def encode(self, images: list) -> list[ImageFeatures]:
        """One ImageFeatures per image, in order. Raises InvalidRequestError(param="image")
        for bad images, more than `max_images`, or PIL/bytes input without a processor."""
        if not isinstance(images, (list, tuple)):
            raise bad_image("images must be a list")
        self.check_count(len(images))
        keyed = []  # (hash, RGB image or pixel tensor)
        for im in images:
            if is_tensor(im):
                if im.dim() != 3 or im.shape[0] != 3 or not im.is_floating_point():
                    raise bad_image(f"a pixel tensor must be float [3, H, W], got {tuple(im.shape)}")
                keyed.append((content_hash(im), im))
            else:
                img = load_image(im)
                keyed.append((content_hash(img), img))
        found: dict[str, Any] = {}  # hash -> embeds (held here: a put below may evict it)
        todo: dict[str, Any] = {}  # hash -> image still to encode (repeats encoded once)
        for h, x in keyed:
            if h in found or h in todo:
                continue
            if (t := self.cache.get(h)) is None:
                todo[h] = x
            else:
                found[h] = t
        self.misses += len(todo)
        self.hits += len(keyed) - len(todo)
        for pixels in (False, True):  # images to preprocess, then ready pixel tensors
            items = [(h, x) for h, x in todo.items() if is_tensor(x) == pixels]
            for i in range(0, len(items), self.max_batch):
                chunk = items[i:i + self.max_batch]
                for (h, _), e in zip(chunk, self._run([x for _, x in chunk], pixels), strict=True):
                    found[h] = e
                    self.cache.put(h, e)
        return [ImageFeatures(h, found[h]) for h, _ in keyed]

    def check_count(self, n: int) -> None:
        """InvalidRequestError(param="image") for more than `max_images` images."""
        if n > self.max_images:
            raise bad_image(f"at most {self.max_images} images per request, got {n}")

    def _run(self, xs: list, pixels: bool) -> list:
        if not pixels:
            if self.processor is None:
                raise bad_image("this model folder has no image processor config: send pixel tensors")
            return self.model.encode_images(**self.processor(xs))
        if len({tuple(x.shape) for x in xs}) != 1:
            raise bad_image("pixel tensors of one request must share one shape")
        import torch

        try:
            return self.model.encode_images(pixel_values=torch.stack(xs))
        except (ValueError, RuntimeError) as exc:
            raise bad_image(f"the vision tower rejected the pixel tensor: {exc}") from exc

    def stats(self) -> dict:
        return {"mm_cache_hits": self.hits, "mm_cache_misses": self.misses,
                "mm_cache_entries": len(self.cache), "mm_cache_bytes": self.cache.nbytes}
