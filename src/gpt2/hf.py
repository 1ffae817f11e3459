"""Hugging Face interop: load GPT-2 checkpoints written by ``transformers``, and write ours back.

A Hugging Face GPT-2 folder holds

    config.json                    ``GPT2Config``: model_type "gpt2", n_layer, n_head, n_embd, ...
    model.safetensors              the weights (or sharded: model.safetensors.index.json + shards,
                                   or the older pickled pytorch_model.bin)
    vocab.json + merges.txt        the byte-level BPE (or tokenizer.json, the `tokenizers` format)
    generation_config.json         end-of-text id and other decoding defaults

Our parameter names are those of ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight``...),
so the mapping is one to one except that Hugging Face stores the four projection matrices of each
block as ``Conv1D`` weights, shaped (in, out), where ``nn.Linear`` holds (out, in): those are
transposed. Older files carry the attention mask as ``attn.bias``/``attn.masked_bias`` buffers;
they are constants, so they are dropped. Anything this architecture cannot express (another model
type, layer-wise attention scaling, an untied output head, ...) is refused, never loaded wrongly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpt2.config import GPTConfig, padded_vocab_size
from gpt2.errors import UserError
from gpt2.files import atomic_file, make_folder, read_json, replaced_folder, write_json
from gpt2.model import GPT
from gpt2.tokenizer import Tokenizer
from gpt2.tokenizer_hf import (
    GPT2_VOCAB_SIZE,
    MERGES_FILE,
    TOKENIZER_CONFIG_FILE,
    VOCAB_FILE,
    check_exportable,
    check_vocab_fits,
    load_hf_tokenizer,
    save_hf_tokenizer,
)
from gpt2.weights_check import check_finite

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# The short names OpenAI's models are known by, and where the Hub keeps them today.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_PATTERNS = (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    "model-*-of-*.safetensors",
    VOCAB_FILE,
    MERGES_FILE,
    TOKENIZER_CONFIG_FILE,
)
HUB_PICKLE_PATTERNS = (PICKLE_FILE, PICKLE_INDEX, "pytorch_model-*-of-*.bin")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hugging Face's GPT-2 keeps these projections as Conv1D, whose weight is (in, out).
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Causal-mask buffers of older files: constants, not parameters.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the dot: not c_attn.bias
PREFIX = "transformer."
HEAD_KEY = "lm_head.weight"
# Names transformers gives the tanh approximation of GELU, the activation this model computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, and GPT-2's
# GPT2Config's defaults, used for fields a config.json leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": GPT2_VOCAB_SIZE,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": LAYER_NORM_EPS,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


# --- the public interface -------------------------------------------------------------------


def load_hf(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a Hugging Face GPT-2 folder or a Hub name (``gpt2``,
    ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``org/name``). `gpt2.checkpoint.load_model`
    takes these and our own checkpoints."""
    folder = resolve_source(source)
    model = _load_hf_model(folder)
    tokenizer = load_hf_tokenizer(folder, model.config.vocab_size)
    return model.to(device), tokenizer


def from_pretrained(source: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The model alone (`GPT.from_pretrained`): a folder without tokenizer files is fine here."""
    from gpt2.checkpoint import load_checkpoint, own_checkpoint_dir

    own = own_checkpoint_dir(source)
    if own is not None:
        return load_checkpoint(own, device).model
    return _load_hf_model(resolve_source(source)).to(device)


def _load_hf_model(folder: Path) -> GPT:
    data = read_json(folder / CONFIG_FILE)
    config = config_from_hf(data, str(folder / CONFIG_FILE))
    tied = data.get("tie_word_embeddings", True) is not False
    weights = read_hf_weights(folder)
    check_finite(weights, str(folder))
    state = state_dict_from_hf(weights, config, str(folder), head_required=not tied)
    return build_model(config, state)


def save_pretrained(model: GPT, folder: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, when given) into ``folder`` in Hugging Face's layout.

    Each file is written atomically. ``transformers.AutoModelForCausalLM.from_pretrained(folder)``
    then loads every weight, with none missing or unexpected. Without a tokenizer only the model
    files are written, as ``transformers``' own ``save_pretrained`` does.
    """
    from gpt2.checkpoint import own_checkpoint_dir

    folder = Path(folder)
    if own_checkpoint_dir(folder) is not None:  # its config.json would be overwritten or shadowed
        raise UserError(f"{folder} holds a gpt2 checkpoint; export to another folder")
    if tokenizer is not None:
        check_exportable(tokenizer)
        check_vocab_fits(tokenizer, model.config.vocab_size, str(folder))
    make_folder(folder)
    eot = tokenizer.eot_token if tokenizer is not None else None
    if eot is not None and eot >= model.config.vocab_size:
        eot = None
    state, config = hf_state_dict(model), model.config
    n = tokenizer.vocab_size if tokenizer is not None else config.vocab_size
    if n < config.vocab_size == padded_vocab_size(n):
        # `gpt2 train --pad-vocab` rounded the embedding up to a multiple of 64 for speed; the
        # rows past the tokenizer's ids were never used, and Hugging Face's files leave them out.
        state[PREFIX + "wte.weight"] = state[PREFIX + "wte.weight"][:n].contiguous()
        log.info("%s: the padded vocabulary (%d) cut to the tokenizer's %d ids",
                 folder, config.vocab_size, n)  # fmt: skip
        config = GPTConfig(**{**config.to_dict(), "vocab_size": n})
    with atomic_file(folder / SAFETENSORS_FILE) as tmp:
        # transformers refuses a safetensors file whose metadata does not name its framework.
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, hf_config(config, eot))
    write_json(folder / GENERATION_CONFIG_FILE, {"bos_token_id": eot, "eos_token_id": eot})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, folder, model.config.block_size)
    return folder


def export_checkpoint(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """``gpt2 export``: one of our checkpoints (or run folders) to a Hugging Face folder."""
    from gpt2.checkpoint import load_checkpoint

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to write into it")
    ckpt = load_checkpoint(checkpoint)
    if out.is_dir() and any(out.iterdir()):  # --force: its other files stay, each ours replaced
        return save_pretrained(ckpt.model, out, ckpt.tokenizer)
    with replaced_folder(out) as tmp:  # a new folder appears whole or not at all
        save_pretrained(ckpt.model, tmp, ckpt.tokenizer)
    return out


# --- where the files are --------------------------------------------------------------------


def resolve_source(source: str | Path) -> Path:
    """A local folder as it is; a Hub name downloaded (or found in the Hub cache)."""
    path = Path(source)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"{path} has no {CONFIG_FILE}; it is not a Hugging Face model folder")
        return path
    if path.exists():
        raise UserError(
            f"{path} is a file; pass the folder that holds {CONFIG_FILE} and the weights"
        )
    name = str(source)
    if looks_local(name):
        raise UserError(f"{name}: no such file or folder")
    if name in HUB_ALIASES or HUB_REPO_ID.match(name):
        return download_from_hub(HUB_ALIASES.get(name, name))
    raise UserError(
        f"{name!r} is neither a folder nor a Hugging Face name (gpt2, gpt2-medium, gpt2-large, "
        "gpt2-xl or org/name)"
    )


def looks_local(name: str) -> bool:
    """A name that is meant as a path on this machine, not a Hub repository: it starts with
    ``/``, ``.`` or ``~``, has more than one separator (or a backslash), ends in a file extension,
    or its first part is a folder here (``out/mistyped``). A missing one is a missing path: the
    Hub would only answer "not found" much later, with advice about downloading."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if Path(name).suffix.lower() in LOCAL_SUFFIXES:
        return True
    return "/" in name and Path(name).parent.is_dir()


LOCAL_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".gguf", ".toml"}


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of ``repo_id``: config, weights (safetensors, else pickle) and tokenizer."""
    manual = (
        f"download config.json, model.safetensors, vocab.json and merges.txt from "
        f"https://huggingface.co/{repo_id} into a folder and pass its path"
    )
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(
            f"{repo_id!r} is not a local folder, and downloading it from the Hugging Face Hub "
            f"needs huggingface_hub (pip install 'gpt2[hub]'); or {manual}"
        ) from None
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS)))
        if not any((folder / f).is_file() for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX)):
            patterns = [CONFIG_FILE, *HUB_PICKLE_PATTERNS]
            folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, no such repository, gated, HTTP errors: the same advice
        raise UserError(
            f"{repo_id!r} is not a local folder and could not be downloaded from the Hugging Face "
            f"Hub ({type(e).__name__}: {_first_line(e)}); {manual}"
        ) from None
    return folder


# --- the config -----------------------------------------------------------------------------


def config_from_hf(data: dict[str, Any], where: str = CONFIG_FILE) -> GPTConfig:
    """Map a ``GPT2Config`` dict to a `GPTConfig`; a `UserError` names the first setting that
    this architecture cannot express."""
    _check_model_type(data, where)
    hf = {**HF_DEFAULTS, **data}
    hf["n_positions"] = data.get("n_positions", data.get("n_ctx", HF_DEFAULTS["n_positions"]))
    refuse = f"{where}: this GPT-2 cannot compute"
    if hf["activation_function"] not in TANH_GELUS:
        raise UserError(
            f"{refuse} activation_function {hf['activation_function']!r} (it uses the tanh "
            f"GELU: {', '.join(TANH_GELUS)})"
        )
    for flag, wanted in (
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
        ("scale_attn_weights", True),
    ):
        if bool(hf[flag]) != wanted:
            raise UserError(f"{refuse} {flag}={json.dumps(hf[flag])} (only {json.dumps(wanted)})")
    n_embd = hf["n_embd"]
    if hf["n_inner"] is not None and hf["n_inner"] != 4 * n_embd:
        raise UserError(
            f"{refuse} n_inner={hf['n_inner']} (the MLP is 4 * n_embd = {4 * n_embd} wide)"
        )
    eps = hf["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        raise UserError(f"{refuse} layer_norm_epsilon={eps} (only {LAYER_NORM_EPS})")
    try:
        # Dropout is a training choice, not part of the weights: 0 here, `gpt2 train --dropout`.
        return GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=n_embd,
            dropout=0.0,
            bias=True,
        )
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _check_model_type(data: dict[str, Any], where: str) -> None:
    model_type = data.get("model_type")
    if model_type == "gpt2":
        return
    if model_type is None:  # the oldest files name only their class
        architectures = data.get("architectures") or []
        if architectures and all(str(a).startswith("GPT2") for a in architectures):
            return
        raise UserError(
            f"{where} has no model_type; only GPT-2 checkpoints (model_type 'gpt2') load here"
        )
    raise UserError(
        f"{where} is a {model_type!r} model; only GPT-2 checkpoints (model_type 'gpt2') load here"
    )


def hf_config(config: GPTConfig, eot: int | None) -> dict[str, Any]:
    """The ``config.json`` of ``GPT2LMHeadModel`` for a model of shape ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # what older readers (llama.cpp's converter) look up
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # GPT-2's own name for the tanh GELU
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
    }


# --- the weights ----------------------------------------------------------------------------


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in ``folder``'s weight files, by name as stored."""
    if (folder / SAFETENSORS_FILE).is_file():
        return _read_safetensors(folder / SAFETENSORS_FILE)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _read_shards(folder, SAFETENSORS_INDEX, _read_safetensors)
    if (folder / PICKLE_FILE).is_file():
        return _read_pickle(folder / PICKLE_FILE)
    if (folder / PICKLE_INDEX).is_file():
        return _read_shards(folder, PICKLE_INDEX, _read_pickle)
    raise UserError(
        f"{folder} has no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PICKLE_FILE}"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict, unpickling nothing but tensors and plain containers."""
    from gpt2.torch_files import load_plain

    data = load_plain(path, str(path))
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return data


def _read_shards(folder: Path, index_name: str, read: Any) -> dict[str, torch.Tensor]:
    index = read_json(folder / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{folder / index_name} has no weight_map")
    weights: dict[str, torch.Tensor] = {}
    inside = folder.resolve()
    for shard in sorted(set(weight_map.values())):
        path = folder / str(shard)
        if not isinstance(shard, str) or not path.resolve().is_relative_to(inside):
            raise UserError(f"{folder / index_name} lists {shard!r}, which is outside {folder}")
        if not path.is_file():
            raise UserError(f"{folder / index_name} lists {shard}, which is not in {folder}")
        weights.update(read(path))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise UserError(
            f"{folder / index_name} maps {missing[0]} to {weight_map[missing[0]]}, which lacks it"
        )
    return weights


@dataclass(frozen=True)
class Slot:
    """One parameter of ours and the tensor that feeds it in a Hugging Face file."""

    ours: str  # e.g. transformer.h.0.attn.c_attn.weight
    hf: str  # e.g. h.0.attn.c_attn.weight (no "transformer." prefix)
    hf_shape: tuple[int, ...]
    transpose: bool  # a Conv1D weight, (in, out) there, (out, in) here


def slots(config: GPTConfig) -> Iterator[Slot]:
    """Every parameter of a model of shape ``config``, in the model's order, the tied head
    excepted (it is the token embedding). Derived from the model itself on the meta device, so
    no memory is used and the list can never drift from the code."""
    with torch.device("meta"):
        model = GPT(config)
    for name, p in model.named_parameters():  # a tied tensor is listed once, as the embedding
        transpose = name.endswith(CONV1D_WEIGHTS)
        shape = tuple(p.shape[::-1]) if transpose else tuple(p.shape)
        yield Slot(name, name.removeprefix(PREFIX), shape, transpose)


def state_dict_from_hf(
    weights: dict[str, torch.Tensor], config: GPTConfig, where: str, head_required: bool = False
) -> dict[str, torch.Tensor]:
    """Our state dict (fp32, ``nn.Linear`` layout) from a Hugging Face file's tensors.

    Raises `UserError` naming the first tensor that is missing or misshapen, the first that
    this model has no place for, or an output head that is not the token embedding. The head
    may be left out (the embedding stands for it) unless the config unties it
    (``head_required``)."""
    hf = {
        name.removeprefix(PREFIX): t
        for name, t in weights.items()
        if not name.endswith(MASK_BUFFERS)
    }
    head = hf.pop(HEAD_KEY, None)
    state: dict[str, torch.Tensor] = {}
    for slot in slots(config):
        tensor = hf.pop(slot.hf, None)
        if tensor is None:
            raise UserError(
                f"{where}: missing tensor {slot.hf} (expected shape {list(slot.hf_shape)})"
            )
        if tuple(tensor.shape) != slot.hf_shape:
            raise UserError(
                f"{where}: tensor {slot.hf} has shape {list(tensor.shape)}, expected "
                f"{list(slot.hf_shape)} from the config"
            )
        tensor = tensor.t() if slot.transpose else tensor
        state[slot.ours] = tensor.to(torch.float32).contiguous()
    if hf:
        raise UserError(
            f"{where}: unexpected tensor {sorted(hf)[0]} (GPT-2's language model has no such weight)"
        )
    wte = state[f"{PREFIX}wte.weight"]
    if head is None and head_required:
        raise UserError(f"{where}: missing tensor {HEAD_KEY} (the config unties it from wte)")
    if head is not None and not torch.equal(head.to(torch.float32), wte):
        raise UserError(
            f"{where}: {HEAD_KEY} differs from the token embedding; this GPT-2 ties its output "
            "head to wte and cannot hold a separate one"
        )
    return state


def build_model(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """A `GPT` holding ``state``, built without a random initialisation to throw away (that
    alone takes seconds for gpt2-xl)."""
    with torch.device("meta"):
        model = GPT(config)
    if any(True for _ in model.buffers()):
        # A buffer's value comes from __init__, which ran on the meta device: build for real.
        model = GPT(config)
        model.load_state_dict(state, strict=False)
        return model
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced wte's tensor
    return model


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's names and Conv1D layout, on the CPU, contiguous.

    A model without biases (``bias=False``) gets zero biases: the same function, in the only
    form GPT-2's config can describe."""
    params = dict(model.named_parameters())
    full = GPTConfig(**{**model.config.to_dict(), "bias": True})
    out: dict[str, torch.Tensor] = {}
    for slot in slots(full):
        p = params.get(slot.ours)
        if p is None:  # a bias this model was built without
            tensor = torch.zeros(slot.hf_shape, dtype=torch.float32)
        else:
            tensor = p.detach().to("cpu", torch.float32)
            tensor = tensor.t() if slot.transpose else tensor
        out[PREFIX + slot.hf] = tensor.contiguous()
    return out


# --- files ----------------------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    """The first line of an exception's message (some run to pages), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
