"""The `pagoda` command: pull, list, generate, serve, chat."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    from pagoda.model_store import DEFAULT_MODEL

    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"registry name or path to a GGUF file / HF directory (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--kv-cache-memory", default="2GiB", help="memory for the KV cache, e.g. 2GiB (default: 2GiB)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once (default: 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (default: 512)")


def _engine_config(args: argparse.Namespace):
    from pagoda.engine.llm_engine import EngineConfig

    return EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens)


def cmd_pull(args: argparse.Namespace) -> int:
    from pagoda.model_store import pull

    print(pull(args.name, force=args.force, progress=True))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pagoda.model_store import list_models

    for row in list_models():
        state = f"pulled  {row['path']}" if row["pulled"] else "not pulled"
        default = " (default)" if row["default"] else ""
        print(f"{row['name']:<24}{state}\n    {row['description']}{default}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.sampling_params import SamplingParams

    engine = LLMEngine(_engine_config(args), progress=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request("cli", prompt, params)
    start, first, count = time.monotonic(), None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            sample = out.outputs[0]
            if sample.delta_token_ids and first is None:
                first = time.monotonic()
            count += len(sample.delta_token_ids)
            sys.stdout.write(sample.delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    elapsed = time.monotonic() - (first or start)
    rate = (count - 1) / elapsed if count > 1 and elapsed > 0 else 0.0
    logging.getLogger("pagoda").info("%d tokens; first after %.2f s, then %.1f tokens/s", count,
                                     (first or start) - start, rate)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from pagoda.server.app import ServerSettings, create_app

    if args.model_arg:
        args.model = args.model_arg
    api_key = args.api_key or os.environ.get("PAGODA_API_KEY") or None
    url = f"http://{args.host}:{args.port}"
    settings = ServerSettings(engine=_engine_config(args), served_model_name=args.served_model_name,
                              api_key=api_key, request_timeout=args.request_timeout, max_waiting=args.max_waiting,
                              progress=True, url=url)
    app = create_app(settings)
    logging.getLogger("pagoda").info("Pagoda %s listening on %s; loading %s (GET /health answers 200 when ready)",
                                     _version(), url, args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=args.access_log,
                timeout_keep_alive=30)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import os

    from pagoda.chat import LocalChat, RemoteChat, run_chat

    if args.url:
        backend = RemoteChat(args.url, api_key=args.api_key or os.environ.get("PAGODA_API_KEY") or None)
    else:
        backend = LocalChat(_engine_config(args))
    return run_chat(backend, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens)


def _version() -> str:
    from pagoda import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="An LLM serving engine for CPUs.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a registry model into the model store")
    p.add_argument("name", help="registry model name (see `pagoda list`)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="registry models and whether they are pulled")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("generate", help="generate a completion for one prompt, streamed to the terminal")
    _engine_args(p)
    p.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat at /")
    _engine_args(p)
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="same as --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on API routes (default: $PAGODA_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: the file name)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="queued requests beyond which new ones get 503 with Retry-After (default: no limit)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take before it is aborted (default: no limit)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="interactive chat in the terminal, on a local engine or a server (--url)")
    _engine_args(p)
    p.add_argument("--url", default=None, help="talk to a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most (default: 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="(default: 0.7)")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        from pagoda.model_store import ModelStoreError

        if isinstance(exc, (ModelStoreError, ValueError)):
            print(f"pagoda: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
