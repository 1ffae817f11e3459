"""``gpt2 serve``: an OpenAI-compatible completions server with a web playground."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
from pathlib import Path

from gpt2.commands.options import add_model_options, int_in, load_for_inference, positive_int
from gpt2.errors import UserError

log = logging.getLogger("gpt2.serve")

API_KEY_ENV = "GPT2_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2.serve.limits import Limits, MiB

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI's completions API) with a web playground",
        description="Serve /v1/completions, /v1/models, /health and a playground page at /. "
        "Needs the serve extra: pip install -e '.[serve]'.",
    )
    add_model_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    p.add_argument(
        "--port", type=int_in(0, 65535), default=8000, help="port (default: 8000; 0: any free port)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)",
    )
    p.add_argument(
        "--model-name", help="the model id clients send (default: the checkpoint's name)"
    )
    shown = {"max_tokens": "the context length", "max_body_bytes": f"{d.max_body_bytes // MiB} MiB"}
    for name, help_text in (
        ("max_batch", "sequences decoded together"),
        ("max_queue", "sequences waiting for a slot before 429"),
        ("max_queued_tokens", "prompt plus completion tokens of the waiting sequences before 429"),
        ("max_tokens", "most tokens per completion"),
        ("max_n", "most choices per prompt"),
        ("max_prompts", "most prompts per request"),
        ("max_body_bytes", "largest request body"),
    ):  # one flag per field of Limits
        p.add_argument(
            "--" + name.replace("_", "-"), type=positive_int, default=getattr(d, name),
            help=f"{help_text} (default: {shown.get(name, getattr(d, name))})",
        )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from gpt2.serve.app import create_app
        from gpt2.serve.limits import Limits
        from gpt2.serve.live import bind
    except ImportError as e:
        raise UserError(
            f"gpt2 serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'"
        ) from None
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty")
    if not _is_loopback(args.host) and not args.api_key:
        log.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )

    try:
        sock = bind(args.host, args.port)  # before loading: a taken port fails in a second
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    with sock:
        model, tokenizer, _ = load_for_inference(args)
        name = args.model_name or _default_name(args.checkpoint)
        app = create_app(model, tokenizer, model_name=name, limits=limits, api_key=args.api_key)
        c = model.config
        cell = model.transformer.wte.weight.element_size()  # the cache's dtype (`KVCache`)
        slot_bytes = 2 * c.n_layer * c.block_size * c.n_embd * cell  # keys and values
        log.info("KV cache: %d slots x %s (--max-batch)", limits.max_batch, _size(slot_bytes))
        host, port = sock.getsockname()[:2]
        log.info("serving %s on http://%s:%d (playground at /)", name, host, port)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _size(n_bytes: int) -> str:
    """``n_bytes`` in the largest binary unit that keeps the figure at least 1 (a tiny model's
    cache slot is some KiB, not "0 MiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def _default_name(source: str) -> str:
    """A Hub name as given; a folder by its name (a run's, for its ckpt/ folder)."""
    path = Path(source).resolve()
    if not path.exists():
        return source
    return path.parent.name if path.name == "ckpt" else path.name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
