"""``gpt2 sample``: generate text from a checkpoint (see `gpt2.generate` for the rules)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gpt2.commands.options import add_model_options, load_for_inference
from gpt2.errors import UserError
from gpt2.generate import SamplingParams, complete, stream
from gpt2.tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint")
    add_model_options(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start of text)")
    g, s = add_sampling_options(p, "tokens to generate per sample")
    g.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams; deterministic (default: 1, off)",
    )
    g.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam search: score = logprob / length ** this (default: 1)",
    )
    g.add_argument(
        "--early-stopping",
        action="store_true",
        help="beam search: stop once num-beams beams have ended",
    )
    s.add_argument(
        "--ignore-eot", action="store_true", help="keep going past the end-of-text token"
    )
    s.add_argument("--num-samples", type=int, default=1, help="how many samples (default: 1)")
    s.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(func=run)  # fmt: skip


# The flags of the "decoding" group: (flag, type, default, help).
DECODING_FLAGS = (
    ("--temperature", float, 0.8, "0 is greedy; higher is more random (default: 0.8)"),
    ("--top-k", int, 200, "sample among the k most likely tokens (default: 200; 0: all)"),
    ("--top-p", float, 1.0,
     "nucleus: the fewest tokens with this much probability, in (0, 1] (default: 1, off)"),
    ("--min-p", float, 0.0,
     "drop tokens less likely than this times the top token's probability (default: 0, off)"),
    ("--repetition-penalty", float, 1.0,
     "CTRL's penalty on tokens already seen, > 1 discourages them (default: 1, off)"),
    ("--presence-penalty", float, 0.0,
     "subtracted from tokens generated at least once (default: 0)"),
    ("--frequency-penalty", float, 0.0,
     "subtracted per earlier occurrence in the output (default: 0)"),
)  # fmt: skip


def add_sampling_options(
    p: argparse.ArgumentParser, max_new_tokens_help: str
) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The sampling flags `params_from_args` reads (``gpt2 sample`` and ``gpt2 chat`` take
    them): the length, the decoding rules, stop strings and the seed. Returns the "decoding"
    and the "stopping and output" groups, for a command to add its own flags to."""
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help=f"{max_new_tokens_help} (default: 200)")  # fmt: skip
    g = p.add_argument_group("decoding")
    for flag, kind, default, help_text in DECODING_FLAGS:
        g.add_argument(flag, type=kind, default=default, help=help_text)
    s = p.add_argument_group("stopping and output")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string (repeatable)")  # fmt: skip
    s.add_argument(
        "--seed", type=int, default=1337, help="random seed: the same seed gives the same text"
    )
    return g, s


def params_from_args(args: argparse.Namespace, **more: object) -> SamplingParams:
    """The settings of `add_sampling_options`' flags, with ``more`` fields (a command's own,
    such as beam search), validated: a bad value is one line naming its flag."""
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            stop=tuple(args.stop),
            seed=args.seed,
            **more,  # type: ignore[arg-type]
        ).validate()
    except UserError as e:  # name the flag, not the field
        flag = "--" + str(e).replace("_", "-").replace("num-return-sequences", "num-samples")
        raise UserError(flag) from None
    return params


def sample_params(args: argparse.Namespace) -> SamplingParams:
    """``gpt2 sample``'s settings: the shared ones, beam search, samples, end-of-text."""
    params = params_from_args(
        args,
        ignore_eot=args.ignore_eot,
        num_return_sequences=args.num_samples,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping=args.early_stopping,
    )
    if args.stream and args.num_beams > 1:
        raise UserError("--stream needs --num-beams 1: beams change until the search ends")
    return params


def crop_prompt(prompt: str, tok: Tokenizer, block_size: int) -> str | list[int]:
    """The prompt's ids, cropped from the left to the context (with a note on stderr).

    The library (`gpt2.generate`) refuses a prompt longer than the context; the command line
    keeps its last ``block_size`` tokens instead, since the model could not see the rest anyway.
    """
    if not prompt:
        # A character vocabulary has no end-of-text: start from a new line.
        return "\n" if tok.eot_token is None else prompt
    ids = tok.encode(prompt)
    if len(ids) > block_size:
        print(
            f"gpt2 sample: note: the prompt has {len(ids)} tokens; keeping the last {block_size} "
            "(the model's context)",
            file=sys.stderr,
        )
        ids = ids[-block_size:]
    return ids


def run(args: argparse.Namespace) -> int:
    params = sample_params(args)
    model, tok, _ = load_for_inference(args)
    prompt = crop_prompt(args.prompt, tok, model.config.block_size)
    if args.stream:
        for i in range(args.num_samples):
            # Sample i of a batch uses seed + i (gpt2.generate): streamed, it is the same text.
            one = dataclasses.replace(params, seed=params.seed + i, num_return_sequences=1)
            pieces = stream(model, tok, prompt, one)  # a bad prompt fails here, before output
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(args.prompt, end="", flush=True)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        return 0
    for i, c in enumerate(complete(model, [prompt], params, tok)):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + (c.text or ""))
    return 0
