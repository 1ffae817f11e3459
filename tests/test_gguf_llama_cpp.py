"""llama.cpp runs our GGUF files as it runs the files its own ``convert_hf_to_gguf.py`` writes.

The tools come from scripts/build_llama_cpp.sh (`make llama-cpp`, cached outside the repository;
CI builds it first and sets GPT2_REQUIRE_LLAMA_CPP=1, so that these tests fail there rather than
skip). Models are tiny and random; their weights are scaled up so that the greedy choice at each
step is clear (the margins are checked), and llama.cpp's float32 arithmetic, which sums in
another order, picks the same token.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.bpe_train import count_words, train_bpe
from gpt2.checkpoint import save_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.generate import generate
from gpt2.hf import save_pretrained
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

pytest.importorskip("gguf")
pytest.importorskip("transformers")  # llama.cpp's converter reads the folder with it

REPO = Path(__file__).resolve().parents[1]
N_CTX = 64  # llama-perplexity's window: the first half is context, the second half is scored
PROMPT = "ROMEO:\nWhat"
N_GREEDY = 24


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The folder holding llama.cpp's bin/ and src/, or a skip that says how to build it."""
    required = os.environ.get("GPT2_REQUIRE_LLAMA_CPP") == "1"
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    found = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_llama_cpp.sh"), "--find"],
        capture_output=True,
        text=True,
    )
    if found.returncode == 0:
        return Path(found.stdout.strip())
    reason = (
        f"llama.cpp cannot be built here: {', '.join(missing)} not installed"
        if missing
        else "llama.cpp is not built: run `make llama-cpp` (scripts/build_llama_cpp.sh)"
    )
    if required:
        pytest.fail(reason)
    pytest.skip(reason)


def run_tool(llama_cpp: Path, tool: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(llama_cpp / "bin" / tool), *args], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


def llama_perplexity(llama_cpp: Path, model: Path, text: Path) -> float:
    done = run_tool(
        llama_cpp, "llama-perplexity", "-m", str(model), "-f", str(text), "-c", str(N_CTX),
        "-b", str(N_CTX), "-t", "1",
    )  # fmt: skip
    out = (done.stdout + done.stderr).decode(errors="replace")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert found, out[-2000:]
    return float(found.group(1))


def llama_tokens(llama_cpp: Path, model: Path, text: Path) -> list[int]:
    done = run_tool(
        llama_cpp, "llama-tokenize", "-m", str(model), "-f", str(text), "--ids", "--log-disable",
        "--no-bos", "--no-escape",
    )  # fmt: skip
    return [int(t) for t in re.findall(r"\d+", done.stdout.decode().strip().splitlines()[-1])]


def llama_greedy(llama_cpp: Path, model: Path, prompt: str) -> bytes:
    """llama-simple's stdout: the prompt's pieces, then greedy pieces until end-of-text."""
    return run_tool(llama_cpp, "llama-simple", "-m", str(model), "-n", str(N_GREEDY), prompt).stdout


@torch.no_grad()
def our_perplexity(model: GPT, ids: list[int]) -> float:
    """llama-perplexity's figure computed by our model: windows of N_CTX tokens, each scoring
    the predictions of its second half (no beginning-of-text token: GPT-2's vocabulary adds
    none)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) // N_CTX * N_CTX, N_CTX):
        window = torch.tensor([ids[start : start + N_CTX]])
        logits, _ = model(window)
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        first = N_CTX // 2
        targets = window[0, first + 1 :]
        nll -= logp[first : N_CTX - 1].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(nll / count)


@torch.no_grad()
def our_greedy(model: GPT, tokenizer: Tokenizer, prompt: str) -> tuple[bytes, float]:
    """Our greedy continuation (KV-cache decoding), cut at end-of-text as llama-simple stops,
    and the smallest gap between the best and second-best logit over the steps."""
    ids = tokenizer.encode(prompt)
    out = generate(model, torch.tensor([ids]), N_GREEDY, temperature=0.0)[0]
    new = out[len(ids) :].tolist()
    if tokenizer.eot_token in new:
        new = new[: new.index(tokenizer.eot_token)]
    logits, _ = model(out[None, : len(ids) + len(new)])
    top2 = logits[0, len(ids) - 1 :].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    return tokenizer.decode_bytes(ids + new) + b"\n", margin


@torch.no_grad()
def scaled_random(config: GPTConfig, seed: int, scale: float = 0.1) -> GPT:
    """Random weights ``scale`` wide (LayerNorm gains around 1): logits far enough apart that
    greedy decoding has no near-ties, and (for the seeds used) no single token repeated."""
    g = torch.Generator().manual_seed(seed)
    model = GPT(config)
    for name, p in model.named_parameters():
        gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
        p.copy_((1.0 if gain else 0.0) + scale * torch.randn(p.shape, generator=g))
    return model.eval()


def export(source: Path, out: Path, gguf_type: str) -> Path:
    argv = ["export", "--format", "gguf", "--checkpoint", str(source), "--out", str(out)]
    assert main([*argv, "--gguf-type", gguf_type]) == 0
    return out


def convert(llama_cpp: Path, folder: Path, out: Path, gguf_type: str) -> Path:
    """llama.cpp's own converter on a Hugging Face folder (with llama.cpp's gguf-py)."""
    done = subprocess.run(
        [sys.executable, str(llama_cpp / "src" / "convert_hf_to_gguf.py"), str(folder)]
        + ["--outfile", str(out), "--outtype", gguf_type],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """The last 6,000 characters of TinyShakespeare: about 1,700 GPT-2 tokens, 26 windows. No
    final newline: llama-perplexity drops one from its file."""
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    text = shakespeare.read_text(encoding="utf-8")[-6000:].rstrip("\n")
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path, Path]:
    """A random GPT-2 with GPT-2's vocabulary: our checkpoint and the Hugging Face folder."""
    folder = tmp_path_factory.mktemp("gpt2")
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=50257)
    model = scaled_random(config, seed=1)
    save_checkpoint(folder / "ckpt", model, GPT2Tokenizer(), TrainConfig())
    save_pretrained(model, folder / "hf", GPT2Tokenizer())
    return model, folder / "ckpt", folder / "hf"


PPL_REL = 1e-3  # the acceptance bound: 0.1%


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_our_file_runs_as_the_converters_file(
    llama_cpp: Path, gpt2_model, held_out: Path, tmp_path: Path, gguf_type: str
) -> None:
    model, ckpt, hf = gpt2_model
    ours = export(ckpt, tmp_path / "ours.gguf", gguf_type)
    theirs = convert(llama_cpp, hf, tmp_path / "theirs.gguf", gguf_type)
    ppl_ours = llama_perplexity(llama_cpp, ours, held_out)
    ppl_theirs = llama_perplexity(llama_cpp, theirs, held_out)
    print(f"{gguf_type}: llama-perplexity ours {ppl_ours:.4f}, converter's {ppl_theirs:.4f}")
    assert ppl_ours == pytest.approx(ppl_theirs, rel=PPL_REL)
    if gguf_type == "f32":
        # ... and both are what our own model computes on the same tokens.
        ids = GPT2Tokenizer().encode(held_out.read_text(encoding="utf-8"))
        assert llama_tokens(llama_cpp, ours, held_out) == ids
        ppl_model = our_perplexity(model, ids)
        print(f"f32: our model's own perplexity {ppl_model:.4f} over {len(ids)} tokens")
        assert ppl_ours == pytest.approx(ppl_model, rel=PPL_REL)


def test_greedy_tokens_equal_ours_gpt2_vocabulary(llama_cpp: Path, gpt2_model, tmp_path) -> None:
    model, ckpt, _ = gpt2_model
    expected, margin = our_greedy(model, GPT2Tokenizer(), PROMPT)
    assert margin > 2e-3  # float32 sums in another order move these logits by ~1e-5
    print(f"gpt2 greedy: {expected!r}, smallest margin {margin:.4f}")
    assert llama_greedy(llama_cpp, export(ckpt, tmp_path / "m.gguf", "f32"), PROMPT) == expected


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_trained_and_character_vocabularies_run_in_llama_cpp(
    llama_cpp: Path, shakespeare: Path, held_out: Path, tmp_path: Path, kind: str
) -> None:
    """A BPE trained as `gpt2 tokenizer train` trains it, and a character vocabulary (with
    characters of two and three bytes): the same ids, the same perplexity, the same greedy
    tokens. The converter has no reference here: it only knows tokenizers by a hash of their
    output, and these are new."""
    text = shakespeare.read_text(encoding="utf-8")
    if kind == "bpe":
        tokenizer: Tokenizer = train_bpe(
            count_words([text[:200_000]]), 512, ["<|endoftext|>"], show_progress=False
        )
    else:
        tokenizer = CharTokenizer(text + "é€")  # two and three bytes
        held_out.with_name("char.txt").write_text(
            held_out.read_text(encoding="utf-8") + "\ncafé €", encoding="utf-8"
        )
        held_out = held_out.with_name("char.txt")
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=tokenizer.vocab_size
    )
    # Seeds whose greedy text is varied: 25 distinct bytes (some not UTF-8) for the BPE, 13
    # distinct characters, the three-byte € among them, for the characters.
    model = scaled_random(config, seed={"bpe": 2, "char": 5}[kind], scale=0.2)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, TrainConfig())
    path = export(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    ids = tokenizer.encode(held_out.read_text(encoding="utf-8"))
    assert llama_tokens(llama_cpp, path, held_out) == ids
    ppl = llama_perplexity(llama_cpp, path, held_out)
    print(f"{kind}: llama-perplexity {ppl:.4f}, ours {our_perplexity(model, ids):.4f}")
    assert ppl == pytest.approx(our_perplexity(model, ids), rel=PPL_REL)
    expected, margin = our_greedy(model, tokenizer, PROMPT)
    assert margin > 2e-3
    print(f"{kind} greedy: {expected!r}, smallest margin {margin:.4f}")
    assert llama_greedy(llama_cpp, path, PROMPT) == expected
