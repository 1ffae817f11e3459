"""GGUF export: a model and its tokenizer in the single file llama.cpp, Ollama and LM Studio run.

GGUF (ggml's format) is a header of typed key-value pairs followed by named tensors. For llama.cpp's
``gpt2`` architecture the file holds

- the hyperparameters, under ``gpt2.*``: block count, context length, width, MLP width, heads,
  LayerNorm epsilon;
- the tokenizer, under ``tokenizer.ggml.*``: model ``gpt2`` (byte-level BPE), pre-tokenizer
  ``gpt-2`` (GPT-2's regular expression), every token as the visible text of GPT-2's
  byte-to-unicode map (space is ``Ġ``), a type per token (normal, or control for a special token
  such as ``<|endoftext|>``), the merges as ``"left right"`` lines, and the end-of-text id as both
  beginning and end of sequence;
- the tensors, under llama.cpp's names (``token_embd``, ``blk.N.attn_qkv``, ...). ggml lists a
  matrix's dimensions fastest first, so a numpy array of shape (out, in), which is ``nn.Linear``'s
  layout and ours, is the (in, out) matrix llama.cpp multiplies by. Hugging Face's GPT-2 keeps its
  four projections as ``Conv1D`` weights, (in, out): those are transposed when such a folder is
  read (`gpt2.hf.state_dict_from_hf`), so every source reaches this module in one layout. The
  output head is tied to the token embedding; llama.cpp reuses ``token_embd`` when ``output`` is
  absent, so it is not written twice.

The choices (which tensors stay float32 under a smaller type, the keys written, token types) follow
llama.cpp's own ``convert_hf_to_gguf.py``, so that both files of the same weights run the same;
the tests compare the two.

A character-level vocabulary has no merges of its own, yet it runs as a byte-level BPE: each
character is the token spelled by its UTF-8 bytes, and a character of several bytes gets the
merges that join its bytes in order. GGUF cannot store an empty list and llama.cpp needs the key,
so an all-ASCII vocabulary carries one merge of two 0xFF bytes, a byte no UTF-8 text holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.config import GPTConfig, padded_vocab_size
from gpt2.errors import UserError
from gpt2.files import atomic_file
from gpt2.model import GPT
from gpt2.tokenizer import EOT_TEXT, GPT2_PATTERN, CharTokenizer, GPT2Tokenizer, Tokenizer

log = logging.getLogger(__name__)

ARCH = "gpt2"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_TYPE = "f32"
INSTALL_HINT = "GGUF export needs the gguf package: pip install 'gpt2[gguf]' (or pip install gguf)"

# Our parameter names (without "transformer.") -> llama.cpp's, for block-level and top-level ones.
BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
TOP_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
PREFIX = "transformer."

# Token types of llama.cpp's vocabulary (gguf.TokenType), spelled here to read without gguf.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def gguf_module() -> Any:
    """The ``gguf`` package (ggml's writer), or a `UserError` saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return gguf


# --- the public interface -------------------------------------------------------------------


def export_gguf(
    source: str | Path, out: str | Path, gguf_type: str = DEFAULT_GGUF_TYPE, force: bool = False
) -> Path:
    """``gpt2 export --format gguf``: one of our checkpoints (or run folders) or a Hugging Face
    GPT-2 folder, to the GGUF file ``out``."""
    from gpt2.checkpoint import load_model

    check_gguf_type(gguf_type)
    gguf_module()  # before loading a large model, not after
    source = Path(source)
    if not source.exists():  # never taken for a Hub name: this command reads local folders only
        raise UserError(f"--checkpoint {source}: no such folder")
    if not source.is_dir():
        raise UserError(f"--checkpoint {source} is a file; pass the folder that holds the model")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the .gguf file to write")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; pass --force to replace it")
    model, tokenizer = load_model(source)
    name = source.name if source.name not in ("ckpt", "") else source.resolve().parent.name
    return write_gguf(model, tokenizer, out, gguf_type, name=name)


def check_gguf_type(gguf_type: str) -> None:
    """A one-line error for a type this module does not write."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")


def write_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | Path,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    name: str | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``path`` as a GGUF file for llama.cpp's GPT-2.

    The file appears whole or not at all: it is written beside ``path`` and renamed."""
    check_gguf_type(gguf_type)
    gguf = gguf_module()
    vocab = gguf_vocabulary(tokenizer)  # refuses a tokenizer llama.cpp cannot run, first
    n_vocab = _vocab_rows(model.config, tokenizer)
    if n_vocab > len(vocab.tokens):  # ids without text: named and marked unused, as llama.cpp's
        vocab.pad_to(n_vocab)  # own converter does
    path = Path(path)
    file_type = _file_type(gguf, gguf_type)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            _add_metadata(writer, gguf, model.config, file_type, name or "gpt2")
            _add_vocabulary(writer, vocab)
            for tensor_name, array in gguf_tensors(model, n_vocab):
                qtype = tensor_type(gguf, tensor_name, array, gguf_type)
                try:
                    data = gguf.quants.quantize(array, qtype)
                except gguf.QuantError:  # rows not a whole number of blocks: half precision instead
                    qtype = gguf.GGMLQuantizationType.F16
                    data = gguf.quants.quantize(array, qtype)
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.add_size_label(
                gguf.size_label(*writer.get_total_parameter_count())
            )  # e.g. "124M"
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except BaseException:  # close it: an open, deleted file would keep its disk space
            with contextlib.suppress(OSError):
                writer.close()
            raise
    log.info("wrote %s (%s)", path, gguf_type)
    return path


# --- hyperparameters ------------------------------------------------------------------------


def _file_type(gguf: Any, gguf_type: str) -> Any:
    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]


def _add_metadata(writer: Any, gguf: Any, config: GPTConfig, file_type: Any, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(1e-5)  # nn.LayerNorm's default, which the model uses
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- tensors --------------------------------------------------------------------------------


def gguf_name(ours: str) -> str:
    """llama.cpp's name for one of our parameters (``transformer.h.3.mlp.c_fc.bias`` ->
    ``blk.3.ffn_up.bias``)."""
    rest = ours.removeprefix(PREFIX)
    stem, _, kind = rest.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    _, block, module = stem.split(".", 2)  # h, N, the module inside the block
    return f"blk.{block}.{BLOCK_NAMES[module]}.{kind}"


def gguf_tensors(model: GPT, n_vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the file as float32 numpy arrays in ``nn.Linear``'s (out, in) layout, under
    llama.cpp's names. A model built without biases gets zero biases (llama.cpp's GPT-2 always
    adds them); the embedding keeps ``n_vocab`` rows."""
    from gpt2.hf import slots

    params = dict(model.named_parameters())
    full = GPTConfig(**{**model.config.to_dict(), "bias": True})
    for slot in slots(full):  # the tied head is listed once, as the embedding
        p = params.get(slot.ours)
        if p is None:
            array = np.zeros(slot.hf_shape, dtype=np.float32)
        else:
            array = p.detach().float().cpu().numpy()
        if slot.ours == f"{PREFIX}wte.weight":
            array = array[:n_vocab]
        yield gguf_name(slot.ours), np.ascontiguousarray(array)


def tensor_type(gguf: Any, name: str, array: np.ndarray, gguf_type: str) -> Any:
    """The storage type of one tensor: vectors (biases, LayerNorm) and the position embedding stay
    float32 under every type, as llama.cpp's converter keeps them; matrices take ``gguf_type``."""
    types = gguf.GGMLQuantizationType
    if array.ndim <= 1 or name.startswith("position_embd.") or "_norm." in name:
        return types.F32
    return {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[gguf_type]


def _vocab_rows(config: GPTConfig, tokenizer: Tokenizer) -> int:
    """How many embedding rows the file keeps: the tokenizer's ids when `gpt2 train --pad-vocab`
    rounded the embedding up (those rows were never used), else the model's own count."""
    n = tokenizer.vocab_size
    if n < config.vocab_size == padded_vocab_size(n):
        return n
    if n > config.vocab_size:
        raise UserError(
            f"the tokenizer has {n} ids but the model only {config.vocab_size} token embeddings"
        )
    return config.vocab_size


# --- the tokenizer --------------------------------------------------------------------------


@dataclass
class GGUFVocabulary:
    """A tokenizer as llama.cpp's byte-level BPE reads it."""

    tokens: list[str]  # by id, in GPT-2's visible byte text
    types: list[int]
    merges: list[str]  # "left right", in rank order
    eot: int | None

    def pad_to(self, n: int) -> None:
        start = len(self.tokens)
        self.tokens += [f"[PAD{i}]" for i in range(start, n)]
        self.types += [TOKEN_UNUSED] * (n - start)


def gguf_vocabulary(tokenizer: Tokenizer) -> GGUFVocabulary:
    """GPT-2's BPE, a BPE trained by `gpt2 tokenizer train`, or a character vocabulary, in
    llama.cpp's form; any other tokenizer is refused in one line."""
    if isinstance(tokenizer, GPT2Tokenizer):
        from gpt2.tokenizer_hf import gpt2_vocab_and_merges

        vocab, merges = gpt2_vocab_and_merges()
        by_id = sorted(vocab, key=vocab.__getitem__)
        types = [TOKEN_CONTROL if t == EOT_TEXT else TOKEN_NORMAL for t in by_id]
        return GGUFVocabulary(by_id, types, list(merges), tokenizer.eot_token)
    if isinstance(tokenizer, CharTokenizer):
        return _char_vocabulary(tokenizer)
    if tokenizer.kind == "bpe":
        return _bpe_vocabulary(tokenizer)
    raise UserError(
        f"the {tokenizer.kind!r} tokenizer has no GGUF form; GPT-2's BPE, BPEs trained by "
        "`gpt2 tokenizer train` and character vocabularies export"
    )


def _bpe_vocabulary(tokenizer: Any) -> GGUFVocabulary:
    from gpt2.bpe import token_to_text

    if tokenizer.pattern != GPT2_PATTERN:
        raise UserError(
            "this BPE splits words with its own pattern; llama.cpp's GPT-2 tokenizer only runs "
            "GPT-2's, so the file would tokenize differently"
        )
    n = tokenizer.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n
    for token, i in tokenizer.vocab.items():
        tokens[i], types[i] = token_to_text(token), TOKEN_NORMAL
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, TOKEN_CONTROL
    merges = [f"{token_to_text(a)} {token_to_text(b)}" for a, b in tokenizer.merges]
    return GGUFVocabulary(tokens, types, merges, tokenizer.eot_token)


def _char_vocabulary(tokenizer: CharTokenizer) -> GGUFVocabulary:
    from gpt2.bpe import token_to_text

    tokens = [token_to_text(c.encode("utf-8")) for c in tokenizer.chars]
    merges: dict[str, None] = {}  # ordered and without repeats
    for c in tokenizer.chars:
        data = c.encode("utf-8")
        for k in range(1, len(data)):  # join the bytes of one character left to right
            merges[f"{token_to_text(data[:k])} {token_to_text(data[k : k + 1])}"] = None
    if not merges:  # 0xFF occurs in no UTF-8 text, so this merge never applies
        never = token_to_text(b"\xff")
        merges[f"{never} {never}"] = None
    return GGUFVocabulary(tokens, [TOKEN_NORMAL] * len(tokens), list(merges), None)


def _add_vocabulary(writer: Any, vocab: GGUFVocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.eot is not None:
        writer.add_bos_token_id(vocab.eot)
        writer.add_eos_token_id(vocab.eot)
