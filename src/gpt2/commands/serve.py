"""``gpt2 serve``: an OpenAI-compatible completions server with a web playground."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from gpt2.commands.options import add_inference_precision, int_in, non_empty, positive_int
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
    p.add_argument(
        "--checkpoint",
        required=True,
        type=non_empty,
        help="our checkpoint folder (or the run folder holding ckpt/), or a Hugging Face GPT-2 "
        "name or folder",
    )
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
        "--model-name",
        default=None,
        help="the model id clients send (default: the checkpoint's name)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_inference_precision(p)
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=d.max_batch,
        help=f"sequences decoded together (default: {d.max_batch})",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=d.max_queue,
        help=f"sequences waiting for a slot before 429 (default: {d.max_queue})",
    )
    p.add_argument(
        "--max-queued-tokens",
        type=positive_int,
        default=d.max_queued_tokens,
        help="prompt plus completion tokens of the waiting sequences before 429 "
        f"(default: {d.max_queued_tokens})",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="most tokens per completion (default: the context length)",
    )
    p.add_argument(
        "--max-n",
        type=positive_int,
        default=d.max_n,
        help=f"most choices per prompt (default: {d.max_n})",
    )
    p.add_argument(
        "--max-prompts",
        type=positive_int,
        default=d.max_prompts,
        help=f"most prompts per request (default: {d.max_prompts})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=d.max_body_bytes,
        help=f"largest request body (default: {d.max_body_bytes // MiB} MiB)",
    )
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
    from gpt2.checkpoint import load_model
    from gpt2.decode_layout import prepare_for_decoding
    from gpt2.device import resolve_device

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    try:
        limits = Limits(
            max_body_bytes=args.max_body_bytes,
            max_tokens=args.max_tokens,
            max_n=args.max_n,
            max_prompts=args.max_prompts,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_queued_tokens=args.max_queued_tokens,
        )
    except ValueError as e:
        raise UserError(str(e).replace("max_", "--max-").replace("_", "-")) from None
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
        device = resolve_device(args.device)
        model, tokenizer = load_model(args.checkpoint, device)
        model = prepare_for_decoding(model, args.quantize, args.dtype)
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
