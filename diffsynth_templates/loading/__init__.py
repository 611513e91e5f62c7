"""Checkpoint reading and model placement (safetensors only)."""

from .model_loading import load_component, load_module_from_files, read_config, save_component
from .safetensors_io import (
    CheckpointError,
    find_weight_files,
    iter_tensors,
    read_header_keys,
    save_safetensors_atomic,
    write_json_atomic,
)

__all__ = [
    "CheckpointError",
    "find_weight_files",
    "iter_tensors",
    "load_component",
    "load_module_from_files",
    "read_config",
    "read_header_keys",
    "save_component",
    "save_safetensors_atomic",
    "write_json_atomic",
]
