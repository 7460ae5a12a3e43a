"""Save and load a store's rows and optimizer state, whole or filtered by bucket (for resharding)."""
from __future__ import annotations

import io
import zlib
from typing import Callable

import pyarrow.fs as pafs
import torch

from .base import EmbeddingStore

FORMAT_VERSION = 1
_CRC_BLOCK = 64 << 20


def file_crc32(path) -> int:
    """CRC-32 of a local file, read in blocks (files of many GB never sit in memory whole)."""
    crc = 0
    with open(path, "rb") as stream:
        while block := stream.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def is_uri(location: str) -> bool:
    """True for a pyarrow.fs URI (s3://, gs://, file://...), False for a local path."""
    return "://" in location


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or any pyarrow.fs URI -> (filesystem, path)."""
    return pafs.FileSystem.from_uri(uri) if is_uri(uri) else (pafs.LocalFileSystem(), uri)


def _open_output(uri: str):
    filesystem, path = resolve_uri(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        filesystem.create_dir(parent, recursive=True)
    return filesystem.open_output_stream(path)


def _read_bytes(uri: str) -> bytes:
    filesystem, path = resolve_uri(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"store snapshot {uri} does not exist") from error


def save_store(store: EmbeddingStore, uri: str) -> None:
    """Write every key, its values and the optimizer step to a file (local path or pyarrow.fs URI)."""
    keys, values = store.export()
    buffer = io.BytesIO()
    torch.save({"version": FORMAT_VERSION, "dim": store.dim, "value_width": store.value_width,
                "optimizer": type(store.optimizer).__name__, "step": store.step,
                "keys": keys, "values": values}, buffer)
    with _open_output(uri) as stream:
        stream.write(buffer.getvalue())


def load_store(store: EmbeddingStore, uris: list[str],
               keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Load snapshots into `store`, keeping only keys where keep(keys) is True. Returns rows loaded."""
    loaded = 0
    for uri in uris:
        try:
            snapshot = torch.load(io.BytesIO(_read_bytes(uri)), weights_only=True)
        except (RuntimeError, EOFError, KeyError) as error:
            raise ValueError(f"store snapshot {uri} is damaged or truncated: {error}") from error
        if snapshot.get("version") != FORMAT_VERSION or snapshot["value_width"] != store.value_width:
            raise ValueError(f"store snapshot {uri} has width {snapshot['value_width']} "
                             f"({snapshot['optimizer']}, dim {snapshot['dim']}); this store expects "
                             f"{store.value_width} ({type(store.optimizer).__name__}, dim {store.dim})")
        keys, values = snapshot["keys"], snapshot["values"]
        if keep is not None:
            mask = keep(keys)
            keys, values = keys[mask], values[mask]
        store.load_items(keys, values)
        store.step = snapshot["step"]
        loaded += keys.numel()
    return loaded
