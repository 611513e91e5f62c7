"""The content store of the feature cache: text embeddings and VAE latents addressed by content key."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..loading import save_safetensors_atomic
from .cache_index import CONTENT_KEY, REBUILD, STORE_KIND, FeatureCacheError, inside_cache, short_repr


class ContentStore:
    """Tensors addressed by content key: ``root/{kind}/{key[:2]}/{key}.safetensors``.

    Safe to share between ranks and concurrent trainings: identical keys mean identical content, and
    each file appears by an atomic rename.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        """The file of ``key``; a key that is not a content hash (e.g. ``../../evil``) is refused."""
        if not isinstance(kind, str) or not STORE_KIND.fullmatch(kind):
            raise FeatureCacheError(
                f"feature store kind {kind!r} is not a plain lowercase word like 'latents'"
            )
        if not isinstance(key, str) or not CONTENT_KEY.fullmatch(key):
            raise FeatureCacheError(
                f"feature store {kind} key {short_repr(key)} is not a content hash (lowercase hex digits); "
                f"the cache that named it is damaged: {REBUILD}"
            )
        return inside_cache(self.root, f"{kind}/{key[:2]}/{key}.safetensors", f"feature store {kind} key")

    def shape(self, kind: str, key: str) -> list[int]:
        """The stored tensor's shape, read from the file header only."""
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.get_slice("tensor").get_shape())
        except (SafetensorError, OSError) as e:
            raise FeatureCacheError(
                f"feature store file {path} is missing or corrupt ({e}); rerun --task data_process to rebuild it"
            ) from e

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def put(self, kind: str, key: str, tensor: Tensor) -> None:
        save_safetensors_atomic({"tensor": tensor}, self.path(kind, key))

    def get(self, kind: str, key: str) -> Tensor:
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("tensor")
        except (SafetensorError, OSError, KeyError) as e:
            raise FeatureCacheError(
                f"feature store file {path} is missing or corrupt ({e}); rerun --task data_process to rebuild it"
            ) from e
