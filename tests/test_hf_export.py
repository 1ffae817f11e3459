"""Exporting to Hugging Face's format, the tokenizers that travel with a model, and fine-tuning
from a Hugging Face folder. transformers reads every folder written here; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint import load_checkpoint, load_model, save_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.hf import save_pretrained
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

SAMPLE = "Hello world, it's  naïve: 日本語 🙂\n\n\tTabs, 1234 digits <|endoftext|> and   spaces.\n"
GPT2_TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)


@torch.no_grad()
def randomize_(model: GPT, seed: int) -> GPT:
    """Random values in every parameter, LayerNorm gains and biases included."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
        p.copy_((1.0 if gain else 0.0) + 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_model(folder: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True
    )
    assert (
        not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ), info
    return model.eval()


def assert_same_logits(ours: GPT, folder: Path, vocab_size: int) -> None:
    idx = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(folder)(idx).logits
        got, _ = ours.eval()(idx)
    assert (got - expected).abs().max().item() <= 1e-4


def gpt2_pair(folder: Path, cache: Path) -> Path:
    """GPT-2's tokenizer as a Hugging Face folder holds it: vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache / "gpt2-tokenizer" / "encoder.json", folder / "vocab.json")
    shutil.copy(cache / "gpt2-tokenizer" / "vocab.bpe", folder / "merges.txt")
    return folder


# --- gpt2 export ----------------------------------------------------------------------------


def test_export_command_writes_a_folder_transformers_loads(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = randomize_(GPT(GPT2_TINY), seed=1)
    save_checkpoint(tmp_path / "run" / "ckpt", model, GPT2Tokenizer(), TrainConfig())
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_positions"], config["eos_token_id"]) == (64, 50256)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256
    assert_same_logits(model, out, 50257)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(SAMPLE)["input_ids"] == GPT2Tokenizer().encode(SAMPLE, allowed_special="all")
    assert theirs.eos_token_id == 50256

    # A second export into the same folder needs --force; the error is one line, exit 2.
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty; pass --force" in err
    assert (
        main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--force"]) == 0
    )


def test_export_refuses_to_overwrite_a_checkpoint(tmp_path: Path) -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=4))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, CharTokenizer("abcd"), TrainConfig())
    with pytest.raises(UserError, match="holds a gpt2 checkpoint; export to another folder"):
        save_pretrained(model, ckpt, CharTokenizer("abcd"))


def test_model_without_biases_exports_zero_biases(tmp_path: Path) -> None:
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50, bias=False)
    model = randomize_(GPT(config), seed=2)
    model.save_pretrained(str(tmp_path))  # no tokenizer: the model files only
    assert not (tmp_path / "vocab.json").exists() and not (tmp_path / "tokenizer.json").exists()
    assert_same_logits(model, tmp_path, 50)
    back = GPT.from_pretrained(str(tmp_path))
    assert back.config.bias and torch.count_nonzero(back.transformer.h[0].attn.c_attn.bias) == 0


def test_padded_vocabulary_is_cut_to_the_tokenizer_on_export(tmp_path: Path) -> None:
    chars = CharTokenizer([chr(ord("a") + i) for i in range(26)])  # 26 ids, padded to 64
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64)
    model = randomize_(GPT(config), seed=5)
    save_pretrained(model, tmp_path, chars)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 26
    idx = torch.randint(0, 26, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_model(tmp_path)(idx).logits  # (2, 16, 26)
        ours, _ = model(idx)
    assert theirs.shape[-1] == 26
    assert (ours[..., :26] - theirs).abs().max().item() <= 1e-4


# --- tokenizers -----------------------------------------------------------------------------


def test_character_model_exports_its_own_tokenizer(tmp_path: Path, shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")[:20000]
    chars = CharTokenizer.from_text(text)
    model = randomize_(
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=chars.vocab_size)),
        3,
    )
    save_pretrained(model, tmp_path, chars)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] is None
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = theirs(text)["input_ids"]
    assert ids == chars.encode(text)
    assert theirs.decode(ids) == text
    assert_same_logits(model, tmp_path, chars.vocab_size)
    _, back = load_model(tmp_path)
    assert back.to_dict() == chars.to_dict()


def test_gpt2_vocabulary_is_recognised_in_both_file_forms(
    tmp_path: Path, asset_cache: Path
) -> None:
    model = randomize_(GPT(GPT2_TINY), seed=4)
    model.save_pretrained(str(tmp_path / "pair"))
    gpt2_pair(tmp_path / "pair", asset_cache)
    _, tok = load_model(tmp_path / "pair")
    assert isinstance(tok, GPT2Tokenizer)
    # transformers' own save writes tokenizer.json alone (the `tokenizers` format).
    model.save_pretrained(str(tmp_path / "json"))
    transformers.AutoTokenizer.from_pretrained(tmp_path / "pair").save_pretrained(tmp_path / "json")
    assert not (tmp_path / "json" / "vocab.json").exists()
    _, tok = load_model(tmp_path / "json")
    assert isinstance(tok, GPT2Tokenizer)
    # No tokenizer files at all: GPT-2's, since the vocabulary fits.
    model.save_pretrained(str(tmp_path / "none"))
    assert isinstance(load_model(tmp_path / "none")[1], GPT2Tokenizer)


def test_no_tokenizer_files_and_a_small_vocabulary(tmp_path: Path) -> None:
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=40)).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(
        UserError, match="has no tokenizer files .* GPT-2's 50257 ids do not fit the model's 40"
    ):
        load_model(tmp_path)
    assert GPT.from_pretrained(str(tmp_path)).config.vocab_size == 40  # the model alone loads


def small_bpe_pair(folder: Path, cache: Path, n_merges: int = 1000) -> Path:
    """A byte-level BPE that is not GPT-2's: its first ``n_merges`` merges, then end-of-text."""
    encoder = json.loads((cache / "gpt2-tokenizer" / "encoder.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in encoder.items() if i < 256 + n_merges}
    vocab["<|endoftext|>"] = 256 + n_merges
    lines = (cache / "gpt2-tokenizer" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(lines[: n_merges + 1]) + "\n", encoding="utf-8")
    return folder


def test_a_bpe_that_is_not_gpt2s(tmp_path: Path, asset_cache: Path) -> None:
    folder = tmp_path / "hf"
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=1257)).save_pretrained(
        str(folder)
    )
    small_bpe_pair(folder, asset_cache)
    try:
        import gpt2.bpe  # noqa: F401  (issue 3's tokenizer)
    except ImportError:
        with pytest.raises(UserError, match="a BPE vocabulary of 1257 tokens that is not GPT-2's"):
            load_model(folder)
        return
    _, tok = load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.kind == "bpe" and tok.vocab_size == 1257
    assert tok.encode(SAMPLE, allowed_special="all") == theirs(SAMPLE)["input_ids"]
    # ... and it exports again as the same pair, which loads back as the same tokenizer.
    out = tmp_path / "again"
    save_pretrained(GPT.from_pretrained(str(folder)), out, tok)
    assert load_model(out)[1].to_dict() == tok.to_dict()


def test_a_tokenizer_with_no_hugging_face_form_is_refused(tmp_path: Path) -> None:
    class Bytes(Tokenizer):
        kind = "bytes"
        vocab_size = 256

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

        def decode(self, ids) -> str:
            return bytes(ids).decode(errors="replace")

        def to_dict(self) -> dict:
            return {"type": self.kind}

    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=256))
    with pytest.raises(UserError, match="the 'bytes' tokenizer has no Hugging Face form"):
        save_pretrained(model, tmp_path / "out", Bytes())
    assert not (tmp_path / "out").exists()  # refused before anything is written


# --- fine-tuning ----------------------------------------------------------------------------


def test_fine_tune_from_a_hugging_face_folder(
    tmp_path: Path, shakespeare: Path, asset_cache: Path
) -> None:
    """The CPU smoke version of the README's recipe: transformers' folder (its tokenizer.json and
    config.json, like a Hub download) -> gpt2 train --init-from -> a checkpoint -> export."""
    torch.manual_seed(0)
    reference = randomize_(GPT(GPT2_TINY), seed=5)
    hf_dir = tmp_path / "hf"
    reference.save_pretrained(str(hf_dir))
    transformers.GPT2Tokenizer.from_pretrained(
        gpt2_pair(tmp_path / "pair", asset_cache)
    ).save_pretrained(hf_dir)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "config.json").is_file()

    text = tmp_path / "little.txt"
    text.write_text(shakespeare.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    data = tmp_path / "data"
    assert (
        main(["-q", "prepare", "--input", str(text), "--tokenizer", "gpt2", "--out", str(data)])
        == 0
    )
    run = tmp_path / "run"
    args = ["-q", "train", "--init-from", str(hf_dir), "--data", str(data), "--out-dir", str(run)]
    args += ["--max-iters", "4", "--eval-interval", "4", "--eval-iters", "2", "--batch-size", "2"]
    args += [
        "--block-size",
        "16",
        "--learning-rate",
        "1e-3",
        "--warmup-iters",
        "1",
        "--sample-tokens",
        "4",
    ]
    assert main([*args, "--device", "cpu"]) == 0

    tuned = load_checkpoint(run)
    assert tuned.model.config.block_size == 16  # the position embeddings cropped to the context
    assert tuned.model.transformer.wpe.weight.shape == (16, 32)
    wte = tuned.model.transformer.wte.weight
    assert not torch.equal(wte, reference.transformer.wte.weight)  # it trained
    assert isinstance(tuned.tokenizer, GPT2Tokenizer)
    assert main(["-q", "export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    assert_same_logits(tuned.model, tmp_path / "export", 50257)


def test_fine_tune_refuses_data_with_another_tokenizer(tmp_path: Path, shakespeare: Path) -> None:
    hf_dir = tmp_path / "hf"
    GPT(GPT2_TINY).save_pretrained(str(hf_dir))
    text = tmp_path / "little.txt"
    text.write_text(shakespeare.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    data = tmp_path / "data"
    assert (
        main(["-q", "prepare", "--input", str(text), "--tokenizer", "char", "--out", str(data)])
        == 0
    )
    with pytest.raises(UserError, match="use different tokenizers .a gpt2 tokenizer, not char"):
        from gpt2.train import Trainer

        Trainer(
            TrainConfig(init_from=str(hf_dir), data=str(data), device="cpu"), show_progress=False
        )
