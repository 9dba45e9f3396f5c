"""S3 storage through s3fs (placeholder until the S3 backend lands: generic fsspec paths)."""

from __future__ import annotations

from typing import Any

import fsspec

from .base import Storage


class S3Storage(Storage):
    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        super().__init__(url, fs, root)
