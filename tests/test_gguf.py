"""`gpt2 export --format gguf`: the file's contents as the gguf package reads them back, and the
command's one-line errors. llama.cpp itself runs the files in tests/test_gguf_llama_cpp.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2.checkpoint import save_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.gguf_export import GGUF_TYPES, gguf_vocabulary, write_gguf
from gpt2.hf import save_pretrained
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer
from gpt2.tokenizer_hf import gpt2_vocab_and_merges

gguf = pytest.importorskip("gguf")

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257)


def read_gguf(path: Path) -> tuple[dict, dict]:
    """The key-value pairs and {name: (type, shape, float32 values)} of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (
            t.tensor_type.name,
            [int(n) for n in t.shape],
            gguf.quants.dequantize(t.data, t.tensor_type),
        )
        for t in reader.tensors
    }
    return kv, tensors


def one_line_error(capsys, argv: list[str], expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_gpt2_file_holds_the_weights_hyperparameters_and_tokenizer(tmp_path: Path) -> None:
    model = GPT(TINY).eval()
    save_checkpoint(tmp_path / "run" / "ckpt", model, GPT2Tokenizer(), TrainConfig())
    out = tmp_path / "model.gguf"
    argv = ["export", "--format", "gguf", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]
    assert main(argv) == 0
    kv, tensors = read_gguf(out)
    assert kv["general.architecture"] == "gpt2" and kv["general.file_type"] == 0
    assert kv["general.name"] == "run"
    hparams = {k.removeprefix("gpt2."): v for k, v in kv.items() if k.startswith("gpt2.")}
    assert hparams == {
        "block_count": 2,
        "context_length": 32,
        "embedding_length": 32,
        "feed_forward_length": 128,
        "attention.head_count": 2,
        "attention.layer_norm_epsilon": pytest.approx(1e-5),
    }
    vocab, merges = gpt2_vocab_and_merges()
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.__getitem__)
    assert kv["tokenizer.ggml.merges"] == list(merges)
    assert kv["tokenizer.ggml.token_type"] == [1] * 50256 + [3]  # <|endoftext|> is control
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == 50256
    # No output head (llama.cpp reuses token_embd), nn.Linear's (out, in) is ggml's {in, out}.
    assert len(tensors) == 4 + 12 * 2
    qkv = model.transformer.h[1].attn.c_attn.weight.detach().numpy()
    assert tensors["blk.1.attn_qkv.weight"][:2] == ("F32", [32, 96])
    assert np.array_equal(tensors["blk.1.attn_qkv.weight"][2], qkv)
    assert np.array_equal(
        tensors["token_embd.weight"][2], model.transformer.wte.weight.detach().numpy()
    )
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then renamed


# Reading GPT-2's 100,000 token and merge strings back is slow in the gguf package: the tests
# below use a character vocabulary of 65 ids.
CHARS = CharTokenizer("\n !&',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz$3")
SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=CHARS.vocab_size)


@pytest.mark.parametrize("gguf_type", GGUF_TYPES[1:])
def test_smaller_types_keep_vectors_and_positions_in_f32(tmp_path: Path, gguf_type: str) -> None:
    model = GPT(SMALL).eval()
    path = write_gguf(model, CHARS, tmp_path / "m.gguf", gguf_type)
    kv, tensors = read_gguf(path)
    wanted = gguf_type.upper()
    assert kv["general.file_type"] == {"F16": 1, "BF16": 32, "Q8_0": 7}[wanted]
    for name, (kind, _, _) in tensors.items():
        vector = name.endswith(".bias") or "_norm." in name or name.startswith("position_embd")
        assert kind == ("F32" if vector else wanted), name
    # Each matrix is its f32 values rounded: 2^-11 relative for f16, 2^-8 for bf16; q8_0 rounds
    # to 1/254 of each block of 32's largest magnitude.
    got = tensors["blk.0.ffn_up.weight"][2]
    want = model.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    scale = np.abs(want).max()
    tol = {"F16": 2**-11 * scale, "BF16": 2**-8 * scale, "Q8_0": scale / 127}[wanted]
    assert np.abs(got - want).max() <= tol


def test_hugging_face_folder_exports_the_same_file(tmp_path: Path) -> None:
    """The same weights from a Hugging Face folder (Conv1D's (in, out) turned back into (out, in)
    on the way in) and from our checkpoint: the same bytes, both folders being named "m"."""
    model = GPT(SMALL).eval()
    save_pretrained(model, tmp_path / "hf" / "m", CHARS)
    save_checkpoint(tmp_path / "ours" / "m", model, CHARS, TrainConfig())
    for name in ("hf", "ours"):
        argv = ["export", "--format", "gguf", "--checkpoint", str(tmp_path / name / "m")]
        assert main([*argv, "--out", str(tmp_path / f"{name}.gguf")]) == 0
    assert (tmp_path / "hf.gguf").read_bytes() == (tmp_path / "ours.gguf").read_bytes()


def test_padded_vocabulary_is_cut_and_a_bias_free_model_gets_zero_biases(tmp_path: Path) -> None:
    config = GPTConfig(n_layer=1, n_head=1, n_embd=32, block_size=16, vocab_size=128, bias=False)
    path = write_gguf(GPT(config), CHARS, tmp_path / "m.gguf")  # 65 ids padded to 128
    kv, tensors = read_gguf(path)
    assert len(kv["tokenizer.ggml.tokens"]) == 65
    assert tensors["token_embd.weight"][1] == [32, 65]
    assert not tensors["blk.0.attn_qkv.bias"][2].any() and tensors["blk.0.attn_qkv.bias"][1] == [96]


def test_character_vocabulary_becomes_bytes_and_merges() -> None:
    vocab = gguf_vocabulary(CharTokenizer("\n ab€é"))
    assert vocab.tokens == ["Ċ", "Ġ", "a", "b", "Ã©", "âĤ¬"]
    # é is C3 A9, € is E2 82 AC: the merges join each character's bytes, left to right.
    assert vocab.merges == ["Ã ©", "â Ĥ", "âĤ ¬"]
    assert vocab.types == [1] * 6 and vocab.eot is None
    # GGUF cannot hold an empty list: an ASCII vocabulary gets a merge that never applies.
    assert gguf_vocabulary(CharTokenizer("ab")).merges == ["ÿ ÿ"]


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys, monkeypatch) -> None:
    save_checkpoint(tmp_path / "ckpt", GPT(SMALL), CHARS, TrainConfig())
    base = ["export", "--format", "gguf", "--checkpoint", str(tmp_path / "ckpt")]
    out = str(tmp_path / "m.gguf")
    one_line_error(capsys, [*base, "--out", out, "--gguf-type", "q4"], "--gguf-type 'q4': choose")
    one_line_error(
        capsys,
        ["export", "--format", "gguf", "--checkpoint", str(tmp_path / "nope"), "--out", out],
        "no such folder",
    )
    one_line_error(
        capsys,
        ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
        + ["--gguf-type", "f16"],
        "--gguf-type applies to --format gguf only",
    )
    one_line_error(capsys, [*base, "--out", str(tmp_path)], "is a folder")
    assert main([*base, "--out", out]) == 0
    one_line_error(capsys, [*base, "--out", out], "exists; pass --force")
    assert main([*base, "--out", out, "--force"]) == 0
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    one_line_error(capsys, [*base, "--out", out, "--force"], "pip install 'gpt2[gguf]'")


def test_unknown_tokenizer_and_other_pattern_are_refused(tmp_path: Path) -> None:
    from gpt2.bpe import BPETokenizer

    gpt2_bpe = BPETokenizer.gpt2()
    other = BPETokenizer(gpt2_bpe.vocab, gpt2_bpe.merges, gpt2_bpe.special_tokens, pattern=r"\S+")
    with pytest.raises(UserError, match="splits words with its own pattern"):
        write_gguf(GPT(TINY), other, tmp_path / "m.gguf")  # refused before writing
    assert not (tmp_path / "m.gguf").exists()


def test_help_documents_the_format_and_types(capsys) -> None:
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--format {hf,gguf}" in text and "llama.cpp" in text and "Ollama" in text
    for name in GGUF_TYPES:
        assert name in text


def test_writing_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", _fail)
    with pytest.raises(RuntimeError):
        write_gguf(GPT(SMALL), CHARS, path)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _fail(*args, **kwargs) -> None:
    raise RuntimeError("disk full")
