"""Loading Hugging Face GPT-2 checkpoints: parity with transformers, the file layouts, refusals.

Every checkpoint here is a random-weight ``GPT2LMHeadModel`` created locally; nothing is
downloaded. Random values are put into every tensor (LayerNorm gains and all biases included),
so that a weight loaded into the wrong place, or not transposed, cannot go unnoticed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import load_model
from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.generate import generate
from gpt2.hf import hf_state_dict, save_pretrained
from gpt2.model import GPT

transformers = pytest.importorskip("transformers")

# (n_layer, n_head, n_embd, n_positions, vocab_size): two small shapes and the real gpt2 124M.
SHAPES = {
    "tiny": (2, 2, 32, 32, 97),
    "odd": (3, 3, 48, 80, 1009),
    "gpt2-124M": (12, 12, 768, 1024, 50257),
}


def hf_config(shape: tuple[int, ...]) -> transformers.GPT2Config:
    n_layer, n_head, n_embd, n_positions, vocab_size = shape
    # No end-of-text id, so that transformers' generate never stops early.
    return transformers.GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=vocab_size,
        bos_token_id=None,
        eos_token_id=None,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every parameter: matrices N(0, 0.02), gains 1 + N(0, 0.1), biases
    N(0, 0.02), so that nothing is left at a value (0 or 1) that would hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            p.copy_(0.02 * noise)
        elif (
            name.endswith("ln_1.weight")
            or name.endswith("ln_2.weight")
            or name.endswith("ln_f.weight")
        ):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.02 * noise)
    return model.eval()


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """The warnings transformers logs (its load report among them) while the block runs."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def load_with_transformers(folder: Path) -> torch.nn.Module:
    """transformers' model from ``folder``, asserting that no weight is missing or unexpected."""
    with transformers_warnings() as warnings:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True
        )
    assert (
        not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ), info
    assert not [w for w in warnings if "missing" in w.lower() or "unexpected" in w.lower()], (
        warnings
    )
    return model.eval()


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A random transformers model of each shape, built once per module, and its saved folder."""
    shape = SHAPES[request.param]
    torch.manual_seed(0)
    model = randomize_(transformers.GPT2LMHeadModel(hf_config(shape)), seed=len(request.param))
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(folder)
    yield request.param, model, folder
    shutil.rmtree(folder, ignore_errors=True)


# --- parity ---------------------------------------------------------------------------------


def test_logits_and_loss_equal_transformers(hf_checkpoint) -> None:
    name, reference, folder = hf_checkpoint
    ours = GPT.from_pretrained(str(folder)).eval()
    vocab, block = ours.config.vocab_size, ours.config.block_size
    idx = torch.randint(0, vocab, (2, min(64, block)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert logits.shape == expected.logits.shape
    assert (logits - expected.logits).abs().max().item() <= 1e-4, name
    assert abs(loss.item() - expected.loss.item()) <= 1e-5, name


def test_greedy_20_tokens_equal_transformers_generate(hf_checkpoint) -> None:
    name, reference, folder = hf_checkpoint
    ours = GPT.from_pretrained(str(folder)).eval()
    prompt = torch.randint(
        0, ours.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        expected = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )
    got = generate(ours, prompt, 20, temperature=0.0)
    assert got.shape == (1, 28)
    assert got.tolist() == expected.tolist(), name


def test_round_trip_through_transformers_is_bit_identical(hf_checkpoint, tmp_path: Path) -> None:
    """ours -> export -> transformers -> transformers' save -> ours: every tensor unchanged."""
    name, _, folder = hf_checkpoint
    n_layer, n_head, n_embd, n_positions, vocab_size = SHAPES[name]
    config = GPTConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=n_positions, vocab_size=vocab_size
    )
    torch.manual_seed(3)
    ours = randomize_(GPT(config), seed=3)
    save_pretrained(ours, tmp_path / "exported")
    theirs = load_with_transformers(tmp_path / "exported")
    theirs.save_pretrained(tmp_path / "resaved")
    back = GPT.from_pretrained(str(tmp_path / "resaved"))
    assert back.config == ours.config
    original, returned = ours.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, returned[key]), key
    assert back.lm_head.weight is back.transformer.wte.weight


# --- file layouts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The tiny shape's transformers model and folder, for the cheap layout and refusal tests."""
    torch.manual_seed(0)
    model = randomize_(transformers.GPT2LMHeadModel(hf_config(SHAPES["tiny"])), seed=7)
    folder = tmp_path_factory.mktemp("hf-tiny")
    model.save_pretrained(folder)
    return model, folder


def assert_same_weights(ours: GPT, reference: torch.nn.Module) -> None:
    """Our model's Hugging Face view equals the reference model's tensors."""
    theirs = reference.state_dict()
    for key, tensor in hf_state_dict(ours).items():
        assert torch.equal(tensor, theirs[key]), key


def legacy_tensors(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layout of the files on the Hub for openai-community/gpt2: no ``transformer.``
    prefix, the causal-mask buffers of the time, and the output head written out."""
    n = reference.config.n_positions
    tensors = {k.removeprefix("transformer."): v.clone() for k, v in reference.state_dict().items()}
    for i in range(reference.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    return tensors


def test_sharded_safetensors(tiny, tmp_path: Path) -> None:
    reference, _ = tiny
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert_same_weights(GPT.from_pretrained(str(tmp_path)), reference)


def test_unprefixed_safetensors_with_mask_buffers_and_head(tiny, tmp_path: Path) -> None:
    reference, folder = tiny
    shutil.copy(folder / "config.json", tmp_path)
    save_file(
        legacy_tensors(reference), str(tmp_path / "model.safetensors"), metadata={"format": "pt"}
    )
    assert_same_weights(GPT.from_pretrained(str(tmp_path)), reference)


def test_pickled_pytorch_model_bin(tiny, tmp_path: Path) -> None:
    reference, folder = tiny
    shutil.copy(folder / "config.json", tmp_path)
    torch.save(legacy_tensors(reference), tmp_path / "pytorch_model.bin")
    assert_same_weights(GPT.from_pretrained(str(tmp_path)), reference)


def test_pickle_with_code_is_refused(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    shutil.copy(folder / "config.json", tmp_path)
    torch.save({"weights": GPTConfig()}, tmp_path / "pytorch_model.bin")  # an arbitrary object
    with pytest.raises(UserError, match=r"not plain tensors .*GPTConfig.*will not be unpickled"):
        GPT.from_pretrained(str(tmp_path))


def test_half_precision_weights_load_as_fp32(tiny, tmp_path: Path) -> None:
    reference, folder = tiny
    shutil.copy(folder / "config.json", tmp_path)
    half = {k: v.half() for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(half, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = GPT.from_pretrained(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    wte = reference.transformer.wte.weight
    assert torch.equal(ours.transformer.wte.weight, wte.half().float())


# --- refusals -------------------------------------------------------------------------------


def copy_with(folder: Path, target: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of ``folder`` with config fields changed and/or the weights replaced."""
    data = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**data, **(config or {})}))
    if tensors is None:
        shutil.copy(folder / "model.safetensors", target)
    else:
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "is a 'llama' model; only GPT-2 checkpoints"),
        (
            {"scale_attn_by_inverse_layer_idx": True},
            "cannot compute scale_attn_by_inverse_layer_idx=true",
        ),
        ({"reorder_and_upcast_attn": True}, "cannot compute reorder_and_upcast_attn=true"),
        ({"activation_function": "relu"}, "cannot compute activation_function 'relu'"),
        ({"activation_function": "gelu"}, "cannot compute activation_function 'gelu'"),
        ({"n_inner": 100}, r"cannot compute n_inner=100 \(the MLP is 4 \* n_embd = 128 wide\)"),
        ({"layer_norm_epsilon": 1e-6}, "cannot compute layer_norm_epsilon=1e-06"),
        ({"add_cross_attention": True}, "cannot compute add_cross_attention=true"),
        ({"scale_attn_weights": False}, "cannot compute scale_attn_weights=false"),
    ],
)
def test_configs_this_architecture_cannot_express_are_refused(
    tiny, tmp_path, change, message
) -> None:
    _, folder = tiny
    with pytest.raises(UserError, match=message):
        GPT.from_pretrained(str(copy_with(folder, tmp_path, config=change)))


def test_missing_tensor_is_named(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    del tensors["transformer.ln_f.weight"]  # later in the model's order: not the one named
    with pytest.raises(
        UserError, match=r"missing tensor h\.1\.mlp\.c_fc\.bias \(expected shape \[128\]\)"
    ):
        GPT.from_pretrained(str(copy_with(folder, tmp_path, tensors=tensors)))


def test_misshapen_tensor_is_named(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    # Stored as nn.Linear would, (out, in): wrong for a Conv1D weight, which is (in, out).
    tensors["transformer.h.0.attn.c_attn.weight"] = (
        tensors["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    )
    with pytest.raises(
        UserError,
        match=r"tensor h\.0\.attn\.c_attn\.weight has shape \[96, 32\], expected \[32, 96\]",
    ):
        GPT.from_pretrained(str(copy_with(folder, tmp_path, tensors=tensors)))


def test_config_that_disagrees_with_the_weights_is_refused(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    with pytest.raises(
        UserError, match=r"tensor wte\.weight has shape \[97, 32\], expected \[98, 32\]"
    ):
        GPT.from_pretrained(str(copy_with(folder, tmp_path, config={"vocab_size": 98})))


def test_untied_output_head_is_refused(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    with pytest.raises(UserError, match="lm_head.weight differs from the token embedding"):
        GPT.from_pretrained(str(copy_with(folder, tmp_path, tensors=tensors)))


def test_untied_config_without_a_head_is_refused(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    target = copy_with(folder, tmp_path, config={"tie_word_embeddings": False})
    with pytest.raises(UserError, match="missing tensor lm_head.weight"):
        GPT.from_pretrained(str(target))


def test_unknown_tensor_is_refused(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["score.weight"] = torch.zeros(2, 32)  # a classification head: not a language model
    with pytest.raises(UserError, match="unexpected tensor score.weight"):
        GPT.from_pretrained(str(copy_with(folder, tmp_path, tensors=tensors)))


def test_folder_without_weights_or_config(tiny, tmp_path: Path) -> None:
    _, folder = tiny
    with pytest.raises(UserError, match="has no config.json"):
        GPT.from_pretrained(str(tmp_path))
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(UserError, match="has no weights: expected model.safetensors"):
        GPT.from_pretrained(str(tmp_path))


def test_a_path_that_is_not_a_name_or_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        GPT.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


# --- the Hub --------------------------------------------------------------------------------


def test_hub_name_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(UserError) as err:
        GPT.from_pretrained("gpt2-medium")
    message = str(err.value)
    assert "needs huggingface_hub (pip install 'gpt2[hub]')" in message
    assert "https://huggingface.co/openai-community/gpt2-medium" in message
    assert "\n" not in message


def test_hub_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(repo_id: str, **kwargs) -> str:
        raise ConnectionError(f"cannot reach huggingface.co for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as err:
        GPT.from_pretrained("someone/gpt2-finetuned")
    message = str(err.value)
    assert (
        "could not be downloaded from the Hugging Face Hub (ConnectionError: cannot reach"
        in message
    )
    assert "pass its path" in message


def test_hub_alias_resolves_to_openai_community(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    reference, folder = tiny
    asked: list[tuple[str, list[str]]] = []

    def snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert_same_weights(GPT.from_pretrained("gpt2"), reference)
    assert asked[0][0] == "openai-community/gpt2"
    assert "model.safetensors" in asked[0][1] and "pytorch_model.bin" not in asked[0][1]


def test_load_model_also_reads_our_own_checkpoints(tmp_path: Path) -> None:
    from gpt2.checkpoint import save_checkpoint
    from gpt2.config import TrainConfig
    from gpt2.tokenizer import CharTokenizer

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=5))
    save_checkpoint(tmp_path / "run" / "ckpt", model, CharTokenizer("abcde"), TrainConfig())
    loaded, tokenizer = load_model(tmp_path / "run")
    assert tokenizer.to_dict() == {"type": "char", "chars": list("abcde")}
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
