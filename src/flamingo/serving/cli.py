"""`flamingo serve`: the OpenAI-compatible server, the rank extension and the chat page."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from flamingo.cli_options import (
    add_quantize_option,
    add_trust_remote_code_option,
    int_range,
    load_model_quietly,
    positive_int,
    torch_device,
)

EPILOG = """examples:
  flamingo serve                                   the embedded model on http://127.0.0.1:8000 (offline)
  flamingo serve --model my-flamingo --device cuda --port 9000
  FLAMINGO_API_KEY=secret flamingo serve --host 0.0.0.0    every /v1 request needs 'Authorization: Bearer secret'
  flamingo serve --allowed-local-media-path /data/images  image_url may name files under /data/images
endpoints: POST /v1/chat/completions, /v1/completions, /v1/rank; GET /v1/models, /health, /metrics, / (chat page)"""


def model_name(spec: str) -> str:
    """The name clients use for the served model: `flamingo-embedded`, a directory's name, or the hub id."""
    if spec == "embedded":
        return "flamingo-embedded"
    path = Path(spec)
    return path.resolve().name if path.exists() else spec


def _cmd_serve(args: argparse.Namespace) -> None:
    from flamingo.errors import import_extra

    for module in ("fastapi", "uvicorn", "prometheus_client", "httpx"):  # one line, not an ImportError's traceback
        import_extra(module, "serve", "flamingo serve")
    import torch
    import uvicorn

    from flamingo.errors import UserError
    from flamingo.model.quantize import check_quantize_mode, quantize_model
    from flamingo.serving.app import create_app
    from flamingo.serving.engine import Engine, EngineConfig
    from flamingo.serving.limits import LOOPBACK_HOSTS, ServerSettings
    from flamingo.serving.server import EngineServer

    # Option mistakes are reported before the (slow) model load.
    default_max_tokens = args.default_max_tokens or min(ServerSettings.default_max_tokens, args.max_tokens)
    hosts = tuple(args.allowed_host)
    allowed_hosts = hosts + LOOPBACK_HOSTS if _is_loopback(args.host) else (hosts or None)
    settings = ServerSettings(
        model_name=args.model_name or model_name(args.model), api_key=args.api_key,
        allowed_hosts=allowed_hosts,
        max_body_bytes=args.max_body_bytes, max_images=args.max_images, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, default_max_tokens=default_max_tokens, max_n=args.max_n,
        max_beams=args.max_beams, max_rank_tokens=args.max_rank_tokens, allow_url_fetch=args.allow_url_fetch,
        allow_private_urls=args.allow_private_urls,
        allowed_local_media_path=args.allowed_local_media_path)
    engine_config = EngineConfig(max_queue=args.max_queue, max_running=args.max_running,
                                 prefill_chunk=args.prefill_chunk,
                                 prefix_cache_bytes=args.prefix_cache_mb << 20,
                                 chat_cache_bytes=args.chat_cache_mb << 20, image_cache_bytes=args.image_cache_mb << 20,
                                 max_prompt_tokens=args.max_prompt_tokens)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here")
    check_quantize_mode(args.quantize)  # torchao missing: said before the model load
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"flamingo serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)

    model = load_model_quietly(args.model, args.trust_remote_code).to(args.device).eval()
    if args.quantize:  # on the serving device: quantized weights are packed for their backend
        quantize_model(model, args.quantize)
    model.fuse_for_inference()  # the frozen vision encoder, e.g. BatchNorm folded: same outputs, faster
    engine = Engine(model, engine_config)
    app = create_app(engine, settings)
    print(f"serving {settings.model_name} on http://{args.host}:{args.port} (chat page at /)", flush=True)
    server = EngineServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                         timeout_graceful_shutdown=5), engine)
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C: uvicorn's forced exit
        pass
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the server could not start (e.g. the port is taken)
    if server.stopped_by is not None:  # stopped by Ctrl-C (130) or SIGTERM (143), cleanly
        # The requests are answered and the engine has stopped; the interpreter's own teardown
        # (freeing the model, unloading torch) would take seconds more on a busy CPU and does
        # nothing a stopped server needs, so the process ends here.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + server.stopped_by)


def _folder(text: str) -> Path:
    if not text or not Path(text).is_dir():  # '' would be the working directory
        raise argparse.ArgumentTypeError(f"{text[:200]!r} is not a directory")
    return Path(text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(sub: argparse._SubParsersAction) -> None:
    from flamingo.serving.limits import ServerSettings

    defaults = ServerSettings()
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web chat page",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--model", default="embedded",
                   help="a saved model directory, a hub id (org/name), or 'embedded' (the default, offline)")
    p.add_argument("--model-name", help="the model id clients send (default: from --model)")
    add_trust_remote_code_option(p)
    add_quantize_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(1, 65535), default=8000)
    p.add_argument("--device", default="cpu", type=torch_device,
                   help="cpu, cuda or cuda:N (one model per device; run one server per GPU behind a load balancer "
                        "to use several)")
    p.add_argument("--api-key", default=os.environ.get("FLAMINGO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FLAMINGO_API_KEY, else none)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header names NAME (repeatable; on a loopback --host only "
                        "loopback names are served by default, against DNS rebinding; elsewhere any name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    media = p.add_argument_group("image sources (data: URLs are always accepted)")
    media.add_argument("--allow-url-fetch", action="store_true",
                       help="fetch http(s) image URLs from public addresses (timeout + size cap)")
    media.add_argument("--allow-private-urls", action="store_true",
                       help="with --allow-url-fetch, also fetch from loopback, private, link-local and reserved "
                            "addresses (this machine's and its network's services: only for trusted clients)")
    media.add_argument("--allowed-local-media-path", type=_folder, metavar="DIR",
                       help="accept file:// URLs and paths of images under DIR (nothing outside it)")
    limits = p.add_argument_group("limits")
    for name, help_text in [("max_body_bytes", "request body size"), ("max_images", "images per request"),
                            ("max_image_bytes", "encoded size of one image"),
                            ("max_image_pixels", "pixels of one image (read from its header)"),
                            ("max_tokens", "cap of a request's max_tokens"),
                            ("max_n", "choices per request (n)"), ("max_beams", "beam width (num_beams)"),
                            ("max_rank_tokens", "tokens of all the candidates of one /v1/rank request")]:
        limits.add_argument("--" + name.replace("_", "-"), type=positive_int, default=getattr(defaults, name),
                            help=f"{help_text} (default {getattr(defaults, name)})")
    limits.add_argument("--default-max-tokens", type=positive_int, default=None,
                        help=f"max_tokens of a request that gives none (default {defaults.default_max_tokens}, "
                             f"at most --max-tokens)")
    limits.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="prompt length in tokens (default: the language model's context)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-queue", type=positive_int, default=64,
                        help="waiting requests; beyond: HTTP 429 (default 64)")
    # The defaults are EngineConfig's (not imported here: it needs torch).
    engine.add_argument("--max-running", type=positive_int, default=64, help="sequences decoded together (default 64)")
    engine.add_argument("--prefill-chunk", type=positive_int, default=16,
                        help="waiting requests prefilled together; their first tokens are sent before the next "
                             "ones are prefilled (default 16)")
    engine.add_argument("--prefix-cache-mb", type=positive_int, default=1024,
                        help="memory bound of the shared prompt-prefix cache (default 1024)")
    engine.add_argument("--chat-cache-mb", type=int_range(0), default=256,
                        help="memory bound of the chats' prefixes (their earlier turns), apart from the prefix "
                             "cache's so that long chats never push out few-shot support sets (default 256; 0: "
                             "not cached)")
    engine.add_argument("--image-cache-mb", type=int_range(0), default=256,
                        help="memory bound of the image cache: each image's visual tokens by the hash of its bytes, "
                             "so an image sent again in a new prompt is not encoded again (default 256; 0: none)")
    p.set_defaults(func=_cmd_serve)
