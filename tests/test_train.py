"""Training: accumulation, precision options, the chunked loss, NaN handling, metrics, plots,
checkpoint rotation and the ready-made configs. Tiny models, a few steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2 import cli
from gpt2 import device as precision
from gpt2.checkpoint import load_checkpoint, step_checkpoints
from gpt2.commands.train import config_path, packaged_configs, resolve_configs
from gpt2.config import GPTConfig, TrainConfig, load_toml, padded_vocab_size
from gpt2.errors import UserError
from gpt2.model import GPT, linear_cross_entropy
from gpt2.prepare import prepare_text
from gpt2.train import EVAL_TOKENS, Trainer, accumulation_steps, build_optimizer

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}


@pytest.fixture(scope="module")
def char_data(shakespeare: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = shakespeare.read_text(encoding="utf-8")[:60_000]
    source = tmp_path_factory.mktemp("text") / "input.txt"
    source.write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("char-data")
    prepare_text(source, out, tokenizer="char", show_progress=False)
    return out


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out_dir=str(out),
        max_iters=6,
        batch_size=4,
        eval_interval=3,
        eval_iters=2,
        log_interval=1,
        sample_tokens=0,
        plot=False,
        device="cpu",
        warmup_iters=2,
        learning_rate=3e-3,
        min_lr=3e-4,
    )
    return TrainConfig(**{**base, **kw})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


# --- accumulation -----------------------------------------------------------------------------


def test_accumulation_steps_from_total_batch_tokens():
    assert accumulation_steps(0, 768, 1) == 1
    assert accumulation_steps(524288, 64 * 1024, 8) == 1
    assert accumulation_steps(524288, 16 * 1024, 1) == 32
    with pytest.raises(
        UserError,
        match="not a multiple of batch_size x block_size x processes = 768; use 1536 or 2304",
    ):
        accumulation_steps(2000, 768, 1)


def test_indivisible_total_batch_is_refused_by_the_trainer(char_data, tmp_path):
    with pytest.raises(UserError, match="total_batch_tokens 1000 is not a multiple"):
        Trainer(config(char_data, tmp_path, total_batch_tokens=1000), TINY, show_progress=False)


def test_two_micro_steps_equal_one_batch_twice_as_large(char_data, tmp_path):
    """The same windows, as one batch of 8 or two accumulated micro-batches of 4."""
    whole = Trainer(config(char_data, tmp_path / "a", batch_size=8), TINY, show_progress=False)
    split = Trainer(
        config(char_data, tmp_path / "b", batch_size=4, total_batch_tokens=8 * 32),
        TINY,
        show_progress=False,
    )
    assert (whole.accum_steps, split.accum_steps) == (1, 2)
    whole.run()
    split.run()
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert list(a) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)


# --- the chunked loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [64, 10 * 7 * 4, 1 << 27])
def test_chunked_linear_cross_entropy_matches_the_plain_loss(chunk_bytes):
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(7, 8, requires_grad=True)
    targets = torch.randint(0, 7, (10,))
    targets[[1, 4]] = -1  # not scored
    plain = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1)
    g_plain = torch.autograd.grad(plain * 3, (hidden, weight))
    chunked = linear_cross_entropy(hidden, weight, targets, chunk_bytes=chunk_bytes)
    g_chunked = torch.autograd.grad(chunked * 3, (hidden, weight))
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    for a, b in zip(g_plain, g_chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss only
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(plain.item())


# --- precision and options ----------------------------------------------------------------------


def test_float16_needs_cuda(char_data, tmp_path):
    with pytest.raises(UserError, match="float16 needs a CUDA GPU"):
        Trainer(config(char_data, tmp_path, dtype="float16"), TINY, show_progress=False)


def test_auto_precision_is_float32_on_a_cpu_without_native_bf16(char_data, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    trainer = Trainer(config(char_data, tmp_path), TINY, show_progress=False)
    assert trainer.dtype == torch.float32 and trainer.cfg.dtype == "float32"
    assert not trainer.scaler.is_enabled()


def test_auto_picks_bfloat16_on_a_native_cpu_says_why_and_records_it(
    char_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(precision, "BF16_MIN_WIDTH", 32)  # TINY is 32 wide
    monkeypatch.setattr(precision, "cpu_peak_flops", lambda dtype=torch.float32: 1e11)
    with caplog.at_level("INFO", logger="gpt2.train"):
        Trainer(
            config(char_data, tmp_path, max_iters=2, eval_interval=2), TINY, show_progress=False
        ).run()
    assert "dtype: bfloat16 (this CPU multiplies bf16 natively: 100 vs 100 GFLOP/s)" in caplog.text
    assert load_checkpoint(tmp_path).train_config.dtype == "bfloat16"  # what ran, not "auto"
    # An explicit float32 always wins.
    trainer = Trainer(config(char_data, tmp_path / "f", dtype="float32"), TINY, show_progress=False)
    assert trainer.dtype == torch.float32


def test_bfloat16_autocast_on_the_cpu_trains(char_data, tmp_path):
    result = Trainer(
        config(char_data, tmp_path, dtype="bfloat16", max_iters=2, eval_interval=2),
        TINY,
        show_progress=False,
    ).run()
    assert math.isfinite(result.val_loss)


def test_pad_vocab_rounds_up_and_samples_decode(char_data, tmp_path):
    assert [padded_vocab_size(n) for n in (64, 65, 50257)] == [64, 128, 50304]
    result = Trainer(
        config(char_data, tmp_path, pad_vocab=True, max_iters=2, sample_tokens=20),
        TINY,
        show_progress=False,
    ).run()
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model.config.vocab_size % 64 == 0
    assert ckpt.model.config.vocab_size > ckpt.tokenizer.vocab_size
    assert isinstance(result.sample, str) and result.sample


# --- NaN / Inf ----------------------------------------------------------------------------------


def poison(trainer: Trainer, at_step: int, micro: int) -> None:
    """Make micro-batch ``micro`` (from 0) of step ``at_step`` (from 1) return a NaN loss."""
    real = trainer._forward_loss
    calls = {"n": 0}

    def forward_loss(model, x, y):
        loss = real(model, x, y)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == (at_step - 1) * trainer.accum_steps + micro + 1:
                return loss * float("nan")
        return loss

    trainer._forward_loss = forward_loss


def test_nan_loss_stops_naming_step_and_micro_batch(char_data, tmp_path):
    cfg = config(
        char_data, tmp_path, total_batch_tokens=2 * 4 * 32, save_interval=2, eval_interval=100
    )
    trainer = Trainer(cfg, TINY, show_progress=False)
    poison(trainer, at_step=4, micro=1)
    with pytest.raises(UserError, match="loss became nan at step 4, micro-batch 2 of 2") as e:
        trainer.run()
    assert "step-00000002" in str(e.value)  # the last checkpoint, intact
    assert load_checkpoint(tmp_path / "ckpt").state["step"] == 2
    assert [p.name for p in step_checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]


def test_nan_loss_skips_the_step_when_asked(char_data, tmp_path):
    trainer = Trainer(config(char_data, tmp_path, on_nan="skip"), TINY, show_progress=False)
    poison(trainer, at_step=3, micro=0)
    before = {}

    def remember(step_fn=trainer.train_step):
        if trainer.step == 2:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        stats = step_fn()
        if trainer.step == 3:
            after = trainer.model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
        return stats

    trainer.train_step = remember
    result = trainer.run()
    assert result.step == 6 and math.isfinite(result.val_loss)
    losses = step_losses(tmp_path)
    assert losses[3] is None and all(losses[s] is not None for s in (1, 2, 4, 5, 6))


# --- metrics, plots, checkpoints --------------------------------------------------------------


def test_metrics_lines_plot_and_checkpoint_rotation(char_data, tmp_path):
    cfg = config(char_data, tmp_path, max_iters=8, eval_interval=2, keep_last=2, plot=True)
    Trainer(cfg, TINY, show_progress=False).run()
    lines = records(tmp_path)
    step_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in step_lines] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "ms_per_iter"):
        assert all(isinstance(r[key], float) and r[key] > 0 for r in step_lines), key
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    kept = [p.name for p in step_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-00000008", "step-00000006"]
    best_step = min(evals, key=lambda r: r["val_loss"])["step"]
    assert load_checkpoint(tmp_path / "checkpoints" / "best").state["step"] == best_step
    assert load_checkpoint(tmp_path).state["step"] == 8  # the run folder: its newest

    png = tmp_path / "again.png"
    assert cli.main(["plot", str(tmp_path), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints(char_data, tmp_path):
    Trainer(config(char_data, tmp_path, max_iters=6), TINY, show_progress=False).run()
    Trainer(config(char_data, tmp_path, max_iters=3), TINY, show_progress=False).run()
    assert [p.name for p in step_checkpoints(tmp_path / "checkpoints")] == ["step-00000003"]
    assert max(r["step"] for r in records(tmp_path)) == 3


def test_sample_every_n_steps(char_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="gpt2")
    Trainer(
        config(char_data, tmp_path, max_iters=4, sample_interval=2, sample_tokens=10),
        TINY,
        show_progress=False,
    ).run()
    assert [r.message.split(" sample")[0] for r in caplog.records if " sample:" in r.message] == [
        "step 2",
        "step 4",
    ]


# --- ready-made configs ---------------------------------------------------------------------------


def test_ready_made_configs_are_valid():
    assert set(packaged_configs()) >= {
        "shakespeare_char",
        "gpt2_124m_fineweb_edu",
        "finetune_gpt2_shakespeare",
    }
    for name in packaged_configs():
        train, _ = resolve_configs(cli.build_parser().parse_args(["train", "--config", name]))
        assert isinstance(train, TrainConfig)  # every field known and in range
    train, overrides = resolve_configs(
        cli.build_parser().parse_args(["train", "--config", "gpt2_124m_fineweb_edu"])
    )
    assert train.model == "gpt2" and overrides == {"dropout": 0.0}
    gpt2 = load_toml(config_path("gpt2_124m_fineweb_edu"))
    assert gpt2["total_batch_tokens"] == 524288 and gpt2["max_iters"] == 19073
    assert (gpt2["learning_rate"], gpt2["warmup_iters"], gpt2["weight_decay"]) == (6e-4, 715, 0.1)
    assert (gpt2["beta1"], gpt2["beta2"]) == (0.9, 0.95)
    assert accumulation_steps(gpt2["total_batch_tokens"], gpt2["batch_size"] * 1024, 8) == 1
    char, _ = resolve_configs(
        cli.build_parser().parse_args(["train", "--config", "shakespeare_char"])
    )
    assert char == TrainConfig(lr_decay_iters=2000)  # what `gpt2 train` runs


def test_unknown_ready_made_config_is_a_clear_error(capsys):
    assert cli.main(["train", "--config", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "neither a file nor a ready-made config" in err and "shakespeare_char" in err


@pytest.mark.slow
def test_compiled_training_evaluates_and_samples(char_data, tmp_path):
    result = Trainer(
        config(char_data, tmp_path, compile=True, max_iters=3, sample_tokens=10),
        TINY,
        show_progress=False,
    ).run()
    assert math.isfinite(result.val_loss) and result.sample


def test_weight_decay_only_on_matrices_and_fused_on_the_cpu() -> None:
    model = GPT(GPTConfig(**{**TINY, "vocab_size": 16}))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["fused"] is True


def test_the_loss_estimate_in_groups_equals_batch_by_batch(char_data, tmp_path):
    """Evaluation runs several batches a forward; the mean per target is that of one batch at a
    time. float32 sums in another order: equal to a few units of the last place of a loss near 4."""
    trainer = Trainer(config(char_data, tmp_path, eval_iters=6), TINY, show_progress=False)
    assert trainer.micro_tokens * 6 <= EVAL_TOKENS
    assert all(len(b) == 1 for b in trainer.eval_batches.values())  # all six in one forward
    together = trainer.estimate_loss()
    trainer.eval_batches = {
        split: [(x[i : i + trainer.cfg.batch_size], y[i : i + trainer.cfg.batch_size])
                for i in range(0, len(x), trainer.cfg.batch_size)]
        for split, ((x, y),) in trainer.eval_batches.items()
    }  # fmt: skip
    assert all(len(b) == 6 for b in trainer.eval_batches.values())
    one_by_one = trainer.estimate_loss()
    for split in ("train", "val"):
        assert together[split] == pytest.approx(one_by_one[split], rel=1e-6)
