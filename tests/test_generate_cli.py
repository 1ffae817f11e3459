"""``gpt2 sample`` end to end: decoding options, streaming, int8, and bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2.checkpoint import save_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.generate import SamplingParams, complete
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer


def random_checkpoint(folder: Path, tokenizer, block_size: int = 64) -> Path:
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layer=2, n_head=2, n_embd=16, block_size=block_size, vocab_size=tokenizer.vocab_size
    )
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return save_checkpoint(folder, model, tokenizer, TrainConfig())


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.\n")
    return random_checkpoint(tmp_path_factory.mktemp("char") / "ckpt", tok)


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("bpe") / "ckpt", GPT2Tokenizer())


def sample(capsys: pytest.CaptureFixture, ckpt: Path, *args: str) -> str:
    assert main(["sample", "--checkpoint", str(ckpt), *args]) == 0
    return capsys.readouterr().out


def test_stream_prints_the_same_text_as_a_whole_completion(char_ckpt: Path, capsys) -> None:
    args = (
        "--prompt",
        "the ",
        "--max-new-tokens",
        "60",
        "--num-samples",
        "2",
        "--stop",
        "x",
        "--stop",
        "q",
    )
    whole = sample(capsys, char_ckpt, *args)
    assert sample(capsys, char_ckpt, *args, "--stream") == whole
    assert whole.count("--- sample") == 2 and whole.count("the ") >= 2


def test_decoding_options_change_the_text_and_greedy_repeats(char_ckpt: Path, capsys) -> None:
    greedy = sample(capsys, char_ckpt, "--prompt", "ab", "--temperature", "0", "--seed", "1")
    assert (
        sample(capsys, char_ckpt, "--prompt", "ab", "--temperature", "0", "--seed", "2") == greedy
    )
    options = [
        ("--top-p", "0.5"), ("--min-p", "0.2"), ("--repetition-penalty", "1.5"),
        ("--presence-penalty", "1"), ("--frequency-penalty", "0.5"), ("--num-beams", "3"),
    ]  # fmt: skip
    for option in options:
        out = sample(capsys, char_ckpt, "--prompt", "ab", "--max-new-tokens", "40", *option)
        assert out.startswith("ab") and len(out) > 2, option


def test_beam_search_prints_num_samples_beams(char_ckpt: Path, capsys) -> None:
    out = sample(capsys, char_ckpt, "--prompt", "ab", "--num-beams", "4", "--num-samples", "3",
                 "--max-new-tokens", "10", "--length-penalty", "0.5", "--early-stopping")  # fmt: skip
    assert out.count("--- sample") == 3


def test_empty_prompt_starts_from_end_of_text(bpe_ckpt: Path, capsys) -> None:
    out = sample(capsys, bpe_ckpt, "--temperature", "0", "--max-new-tokens", "5", "--ignore-eot")
    tok = GPT2Tokenizer()
    from gpt2.checkpoint import load_checkpoint

    model = load_checkpoint(bpe_ckpt).model.eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eot=True)
    assert out == complete(model, [[tok.eot_token]], params, tok)[0].text + "\n"


def test_int8_runs_from_the_command_line(char_ckpt: Path, capsys) -> None:
    out = sample(
        capsys, char_ckpt, "--prompt", "abc", "--quantize", "int8", "--max-new-tokens", "20"
    )
    assert out.startswith("abc")


def run_cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
        (["--num-beams", "0"], "--num-beams must be an integer >= 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 0"),
        (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
        (["--stream", "--num-beams", "2"], "--stream needs --num-beams 1"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
        (["--prompt", "ABC"], "outside this model's vocabulary"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    char_ckpt: Path, capsys, args: list[str], message: str
) -> None:
    err = run_cli_error(["sample", "--checkpoint", str(char_ckpt), *args], capsys)
    assert message in err
