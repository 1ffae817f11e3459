"""``gpt2 sample``: generate text from a checkpoint."""

from __future__ import annotations

import argparse

import torch

from gpt2.checkpoint import load_checkpoint
from gpt2.errors import UserError
from gpt2.generate import generate
from gpt2.train import resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or the run folder holding ckpt/)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of text)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (default: 200; 0: all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise UserError("--max-new-tokens must not be negative")
    if args.temperature < 0:
        raise UserError("--temperature must not be negative")
    if args.top_k < 0 or args.num_samples < 1:
        raise UserError("--top-k must be >= 0 and --num-samples >= 1")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    prompt = tok.encode(args.prompt) if args.prompt else []
    if not prompt:
        prompt = [tok.eot_token] if tok.eot_token is not None else tok.encode("\n")
    # Cropped from the left: the model sees only the last block_size tokens anyway.
    prompt = prompt[-model.config.block_size :]
    g = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k or None, generator=g)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(row[len(prompt) :]))
    return 0
