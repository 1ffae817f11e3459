"""Decoding in bfloat16 and int8: each precision's KV-cache greedy equals its own cache-free
definition (`cache_free.cache_free_greedy` on the same prepared model), the sampler sees float32
logits, and the command line takes ``--dtype`` / ``--quantize`` or refuses them in one line.

Models are tiny and random with weights at std 0.3 (as in tests/test_generate.py), so that
greedy output does not collapse into one repeated token. In bfloat16 the two paths agree to the
bit at almost every step: the products round once from float32 sums, attention runs in float32
and the logits stay float32 (`gpt2.decode_layout.Float32Head`); a bfloat16 attention kernel or
bfloat16 logits made them differ by 0.01-0.1 at every step, and these tests fail then.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cache_free import cache_free_greedy

from gpt2 import native
from gpt2.checkpoint import load_checkpoint, save_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.decode_layout import prepare_for_decoding
from gpt2.errors import UserError
from gpt2.generate import KVCacheEngine, SamplingParams, complete, generate
from gpt2.int8 import Int8Linear, int8_linear_reference
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer

SHAPES = [
    dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64),
    dict(n_layer=3, n_head=4, n_embd=48, vocab_size=97, bias=False),
]
PRECISIONS = [("none", "float32"), ("none", "bfloat16"), ("int8", "float32")]


def tiny_model(seed: int, **shape: int | bool) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, **shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(params=["native", "pytorch"])
def kernels(request, monkeypatch) -> str:
    """Each test twice: with the native kernels (`gpt2.native`) and with PyTorch's own."""
    if request.param == "native":
        if not native.available():
            pytest.skip("the native kernels could not be built here")
    else:
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


@pytest.mark.parametrize(("quantize", "dtype"), PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cached_greedy_equals_cache_free_in_each_precision(
    kernels: str, quantize: str, dtype: str, shape: dict
) -> None:
    model = prepare_for_decoding(tiny_model(3, **shape), quantize, dtype)
    prompt = [1, 5, 2, 7, 3]
    out = generate(model, torch.tensor([prompt]), 60, temperature=0.0)[0, len(prompt) :]
    expected = cache_free_greedy(model, prompt, 60)
    assert out.tolist() == expected


@pytest.mark.parametrize(("quantize", "dtype"), PRECISIONS)
def test_a_batch_and_the_sliding_window_equal_cache_free(
    kernels: str, quantize: str, dtype: str
) -> None:
    model = prepare_for_decoding(tiny_model(4, **SHAPES[0]), quantize, dtype)
    model.config.block_size = 32  # the window slides twice in 60 tokens
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5]]
    params = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eot=True)
    got = complete(model, prompts, params)
    for c, prompt in zip(got, prompts, strict=True):
        assert c.tokens == cache_free_greedy(model, prompt, 60)


@pytest.mark.parametrize(("quantize", "dtype"), PRECISIONS)
def test_a_native_step_does_not_depend_on_the_rest_of_its_batch(quantize: str, dtype: str) -> None:
    if not native.available():
        pytest.skip("the native kernels could not be built here")
    model = prepare_for_decoding(tiny_model(8, **SHAPES[1]), quantize, dtype)
    prompts = [[1 + i, 2, 3 + i, 4][: 1 + i % 4] for i in range(8)]
    batch, alone = KVCacheEngine(model, 8, 32), KVCacheEngine(model, 1, 32)
    for slot, prompt in enumerate(prompts):
        batch.prefill(slot, prompt)  # one by one: the same prefill as alone
    alone.prefill(0, prompts[5])
    for token in (7, 3, 9, 1):
        together = batch.decode(list(range(8)), [token] * 8)
        assert torch.equal(together[5], alone.decode([0], [token])[0])  # to the bit


def test_bfloat16_weights_are_cast_whole_and_logits_come_back_float32() -> None:
    model = prepare_for_decoding(tiny_model(5, **SHAPES[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    engine = KVCacheEngine(model, slots=2, max_len=32)
    assert engine.cache.k.dtype == torch.bfloat16  # half the bytes of float32, nothing lost
    logits = engine.prefill(0, [1, 2, 3])
    assert logits.dtype == torch.float32
    assert engine.decode([0], [4]).dtype == torch.float32


def test_bfloat16_logits_stay_close_to_float32() -> None:
    fp32 = tiny_model(6, **SHAPES[0])
    idx = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        ref, _ = fp32(idx)
        got, _ = prepare_for_decoding(fp32, dtype="bfloat16")(idx)
    # About 12 roundings of 2**-9 on the way through two layers: a few percent, not more.
    assert (got.float() - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize(
    ("k", "n", "m"), [(768, 3072, 1), (3072, 768, 5), (48, 97, 20), (100, 7, 3)]
)
def test_native_kernels_compute_what_pytorch_computes(k: int, n: int, m: int) -> None:
    if not native.available():
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(k + n)
    lin = torch.nn.Linear(k, n)
    x = torch.randn(m, k) * 3
    q = Int8Linear(lin.weight, lin.bias)
    got = torch.ops.gpt2.linear_int8(x, q.qweight, q.scale, q.bias)
    assert torch.equal(got, int8_linear_reference(x, q.qweight, q.scale, q.bias))  # exact
    ref = lin(x).detach()
    assert (got - ref).norm() < 0.02 * ref.norm()  # 8-bit weights and activations
    # float32: the same sums in another order, float32's rounding (K terms of magnitude ~3)
    f32 = torch.ops.gpt2.linear(x, lin.weight.detach(), lin.bias.detach(), False)
    assert torch.allclose(f32, ref, rtol=0, atol=1e-5 * k**0.5 * 3)
    # bfloat16: float32 sums of exact bf16 products, rounded once, like oneDNN's product
    xb, wb, bb = x.bfloat16(), lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    exact = F.linear(xb.double(), wb.double(), bb.double())
    bf16 = torch.ops.gpt2.linear(xb, wb, bb, False)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, exact.bfloat16()) or (bf16.double() - exact).abs().max() <= (
        exact.abs().max() * 2**-8
    )
    logits = torch.ops.gpt2.linear(xb, wb, bb, True)  # float32 output: not rounded to bf16
    assert logits.dtype == torch.float32
    assert torch.allclose(logits.double(), exact, rtol=1e-5, atol=1e-5)


def test_the_native_layout_keeps_names_tying_and_tokens(kernels: str) -> None:
    model = tiny_model(7, **SHAPES[0])
    prompt = torch.tensor([[1, 2, 3]])
    tokens = generate(model, prompt, 40, temperature=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_decoding(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (getattr(model, "native_step", None) is not None) == (kernels == "native")
    assert torch.equal(generate(model, prompt, 40, temperature=0.0), tokens)


def test_unknown_or_conflicting_precisions_are_refused() -> None:
    with pytest.raises(UserError, match="unknown dtype 'float64'; choose from float32, bfloat16"):
        prepare_for_decoding(tiny_model(0, **SHAPES[0]), dtype="float64")
    with pytest.raises(UserError, match="int8 decoding keeps float32 activations"):
        prepare_for_decoding(tiny_model(0, **SHAPES[0]), "int8", "bfloat16")


# The command line ------------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return save_checkpoint(tmp_path_factory.mktemp("prec") / "ckpt", model, tok, TrainConfig())


def test_sample_in_bfloat16_prints_the_library_s_greedy_text(char_ckpt: Path, capsys) -> None:
    args = ["sample", "--checkpoint", str(char_ckpt), "--prompt", "the ", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "30", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    c = load_checkpoint(char_ckpt)
    model = prepare_for_decoding(c.model, dtype="bfloat16")
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    assert out == "the " + complete(model, ["the "], params, c.tokenizer)[0].text + "\n"


def eval_perplexity(path: Path, ckpt: Path, tmp_path: Path, *flags: str) -> float:
    out = tmp_path / f"eval{len(flags)}{'-'.join(flags)}.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--task", "perplexity", "--data", str(path)]
    assert main([*argv, "--out", str(out), "-q", *flags]) == 0
    return json.loads(out.read_text())["metrics"]["perplexity"]


def test_eval_takes_dtype_and_quantize(char_ckpt: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    fp32 = eval_perplexity(text, char_ckpt, tmp_path)
    bf16 = eval_perplexity(text, char_ckpt, tmp_path, "--dtype", "bfloat16")
    int8 = eval_perplexity(text, char_ckpt, tmp_path, "--quantize", "int8")
    assert fp32 != bf16 and fp32 != int8  # each ran in its own precision...
    assert abs(bf16 / fp32 - 1) < 0.05 and abs(int8 / fp32 - 1) < 0.05  # ...of the same model


def test_int8_with_bfloat16_is_one_line_from_the_command_line(char_ckpt: Path, capsys) -> None:
    argv = ["sample", "--checkpoint", str(char_ckpt), "--quantize", "int8", "--dtype", "bfloat16"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "int8 decoding keeps float32 activations" in err


def test_serve_in_bfloat16_answers_with_the_library_s_greedy_text(char_ckpt: Path) -> None:
    """``gpt2 serve --dtype bfloat16`` as a process: its greedy completion is the library's."""
    pytest.importorskip("fastapi")
    import httpx

    c = load_checkpoint(char_ckpt)
    model = prepare_for_decoding(c.model, dtype="bfloat16")
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eot=True)
    want = complete(model, ["the "], params, c.tokenizer)[0].text
    cmd = [sys.executable, "-m", "gpt2", "serve", "--checkpoint", str(char_ckpt), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--dtype", "bfloat16"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:  # "serving ckpt on http://127.0.0.1:PORT (playground at /)"
            if "serving" in line:
                url = line.split(" on ")[1].split()[0]
                break
        assert url is not None, "the server did not start"
        body = {"prompt": "the ", "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    finally:
        proc.terminate()
        proc.wait(timeout=30)
