"""The `pagoda` command: pull, list, generate, serve, chat, bench."""

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
    p.add_argument("--kv-cache-memory", default="auto",
                   help="memory for the KV cache per rank, e.g. 2GiB; auto (default): what the host has left once "
                        "the weights are loaded, times --memory-utilization, less the activations, at most "
                        "--max-num-seqs requests of --max-model-len tokens")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="with --kv-cache-memory auto: the fraction of the memory left that the engine may take "
                        "(default: 0.9)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once (default: 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens computed per step, beside one token per decoding request (default: 512)")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "cpu", "reference"),
                   help="auto: the native CPU kernel when it can run, else the torch reference (default: auto)")
    p.add_argument("--quantization", default="auto", choices=("auto", "gguf", "gguf-a8", "int8", "none"),
                   help="gguf: compute on the GGUF file's own Q4_1/Q8_0 blocks (exact weights); gguf-a8: the "
                        "same with activations rounded to int8 for the 4-bit layers, as llama.cpp does (faster "
                        "prefill, outputs further from fp32); int8: requantize every linear layer to int8; "
                        "none: weights in --dtype; auto (default): gguf for a GGUF file on the CPU, else none")
    p.add_argument("--kv-cache-dtype", default="auto",
                   choices=("auto", "float32", "float16", "bfloat16", "int8", "fp8_e4m3", "fp8_e5m2"),
                   help="element type of the KV cache; auto (default): float16 for a float32 model on the CPU "
                        "(half the memory traffic of decode attention), else the model's dtype; int8, fp8_e4m3, "
                        "fp8_e5m2: 8-bit codes with a scale per row, 1.88x the tokens of float16 and faster decode "
                        "attention, outputs further from fp32 (int8 the closest)")
    p.add_argument("--kernel-plan", default="kernel", metavar="kernel|auto|bf16:N",
                   help="the path of the quantized linear layers by rows per call: kernel (default): the compiled "
                        "kernels, every output row bit-identical whatever else is in the batch; auto: times the "
                        "kernels against bf16 GEMMs (AMX or AVX512-BF16 kernels where the CPU has them) on the "
                        "model's shapes at load (cached per machine) and takes bf16 where faster: prefill and large "
                        "batches run several times faster there, but outputs then depend on how steps are composed; "
                        "bf16:N: "
                        "bf16 GEMMs from N rows on. `pagoda kernel-plan` prints the timings")
    g = p.add_argument_group("parallelism (torch.distributed; see README)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every layer's matrices over N ranks (default: 1)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers over M pipeline stages (default: 1); ranks = N x M")
    g.add_argument("--pipeline-layers", default=None, metavar="L1,L2,...",
                   help="layers per pipeline stage (default: balanced)")
    g.add_argument("--threads-per-rank", type=int, default=None,
                   help="compute threads of each rank (default: this machine's cores / its ranks)")
    g.add_argument("--distributed-timeout", type=float, default=60.0,
                   help="seconds a rank may wait inside a step before the engine fails as dead (default: 60)")
    g.add_argument("--nnodes", type=int, default=1,
                   help="machines the ranks run on, without torchrun (each runs world / nnodes ranks)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 runs the driver")
    g.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (with --nnodes)")
    g.add_argument("--master-port", type=int, default=29500, help="a free port on node 0 (with --nnodes)")


def _engine_config(args: argparse.Namespace):
    from pagoda.engine.llm_engine import EngineConfig

    return EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                        memory_utilization=args.memory_utilization,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_prefill_tokens=args.max_prefill_tokens, attention_backend=args.attention_backend,
                        quantization=None if args.quantization == "none" else args.quantization,
                        kv_cache_dtype=args.kv_cache_dtype, kernel_plan=args.kernel_plan,
                        tensor_parallel_size=args.tensor_parallel_size,
                        pipeline_parallel_size=args.pipeline_parallel_size,
                        pipeline_layers=_int_list(args.pipeline_layers), threads_per_rank=args.threads_per_rank,
                        distributed_timeout=args.distributed_timeout)


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated layer counts, got {text!r}") from None


def _engine(args: argparse.Namespace, config=None, progress: bool = True):
    """The engine for a command, on the driver; None when this process is a worker rank (it has served its
    steps when this returns)."""
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.parallel.launch import launch_for, run_worker_node

    config = config or _engine_config(args)
    launch = launch_for(config, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if launch is not None and not launch.is_driver:
        run_worker_node(config, launch)
        return None
    return LLMEngine(config, progress=progress, launch=launch.executor_launch if launch else None)


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
    from pagoda.sampling_params import SamplingParams

    engine = _engine(args)
    if engine is None:
        return 0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request("cli", prompt, params)
    start, first, count = time.monotonic(), None, 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                sample = out.outputs[0]
                if sample.delta_token_ids and first is None:
                    first = time.monotonic()
                count += len(sample.delta_token_ids)
                sys.stdout.write(sample.delta_text)
                sys.stdout.flush()
    finally:
        engine.shutdown()
    sys.stdout.write("\n")
    elapsed = time.monotonic() - (first or start)
    rate = (count - 1) / elapsed if count > 1 and elapsed > 0 else 0.0
    logging.getLogger("pagoda").info("%d tokens; first after %.2f s, then %.1f tokens/s", count,
                                     (first or start) - start, rate)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from pagoda.config import parse_size
    from pagoda.parallel.launch import launch_for, run_worker_node
    from pagoda.server.app import ServerSettings, create_app
    from pagoda.server.runner import serve

    if args.model_arg:
        args.model = args.model_arg
    api_key = args.api_key or os.environ.get("PAGODA_API_KEY") or None
    url = f"http://{args.host}:{args.port}"
    config = _engine_config(args)
    launch = launch_for(config, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if launch is not None and not launch.is_driver:  # a worker node / rank: no HTTP, serve steps
        run_worker_node(config, launch)
        return 0
    settings = ServerSettings(engine=config, served_model_name=args.served_model_name,
                              api_key=api_key, request_timeout=args.request_timeout, max_waiting=args.max_waiting,
                              max_request_bytes=parse_size(args.max_request_bytes),
                              shutdown_timeout=args.shutdown_timeout, progress=True, url=url,
                              reasoning_parser=args.reasoning_parser,
                              launch=launch.executor_launch if launch else None)
    app = create_app(settings)
    logging.getLogger("pagoda").info("Pagoda %s listening on %s; loading %s (GET /health answers 200 when ready)",
                                     _version(), url, args.model)
    serve(app, args.host, args.port, access_log=args.access_log)
    engine = app.state.pagoda.engine
    if engine is not None and engine.dead_error is not None:
        logging.getLogger("pagoda").error("stopped: the engine died (%s)", engine.dead_error)
        return 1
    logging.getLogger("pagoda").info("stopped")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import os

    from pagoda.chat import LocalChat, RemoteChat, run_chat

    if args.url:
        backend = RemoteChat(args.url, api_key=args.api_key or os.environ.get("PAGODA_API_KEY") or None)
    else:
        backend = LocalChat(_engine_config(args))
    return run_chat(backend, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens)


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    p.add_argument("--input-len", type=int, default=None,
                   help="tokens per synthetic prompt (default: 128 unless --dataset is given)")
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help='JSONL ({"prompt": ..., "output_len": optional} per line) or ShareGPT JSON')
    p.add_argument("--output-len", type=int, default=None,
                   help="tokens to generate per request (default: the dataset's own, else 128)")
    p.add_argument("--output-len-range", default=None, metavar="MIN:MAX",
                   help="draw each request's output length uniformly from MIN..MAX (overrides --output-len)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, output lengths and arrivals (default: 0)")
    p.add_argument("--result-json", default=None, metavar="PATH", help="write the full result as JSON")


def _workload_spec(args: argparse.Namespace):
    from pathlib import Path

    from pagoda.bench.workload import DEFAULT_INPUT_LEN, WorkloadSpec, parse_length_range

    input_len = args.input_len if args.input_len is not None or args.dataset else DEFAULT_INPUT_LEN
    return WorkloadSpec(num_prompts=args.num_prompts, input_len=input_len,
                        dataset=Path(args.dataset) if args.dataset else None, output_len=args.output_len,
                        output_len_range=parse_length_range(args.output_len_range) if args.output_len_range else None,
                        seed=args.seed)


def _workload_json(spec) -> dict:
    from dataclasses import asdict

    return {**asdict(spec), "dataset": str(spec.dataset) if spec.dataset else None}


def _write_result_json(path: str | None, result: dict) -> None:
    import json
    from pathlib import Path

    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import math
    import os

    from pagoda.bench.serve import ServeConfig, run_serve_benchmark
    from pagoda.bench.stats import format_summary
    from pagoda.bench.workload import build_workload, load_tokenizer
    from pagoda.model_store import DEFAULT_MODEL, ModelNotFoundError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the progress bar
    tokenizer_name = args.tokenizer or args.model or DEFAULT_MODEL
    try:
        tokenizer = load_tokenizer(tokenizer_name)
    except ModelNotFoundError as exc:
        hint = "" if args.tokenizer else " (it comes from --model; pass --tokenizer with a local model of the server)"
        raise ValueError(f"cannot load a tokenizer for {tokenizer_name!r}{hint}: {exc}") from None
    spec = _workload_spec(args)
    requests = build_workload(spec, tokenizer)
    config = ServeConfig(url=args.url.rstrip("/"), endpoint=args.endpoint, model=args.model,
                         api_key=args.api_key or os.environ.get("PAGODA_API_KEY") or None,
                         concurrency=args.concurrency,
                         request_rate=args.request_rate if args.request_rate is not None else math.inf,
                         ignore_eos=args.ignore_eos, new_connection_per_request=args.new_connection_per_request,
                         warmup=args.warmup, seed=args.seed)
    result = run_serve_benchmark(config, requests)
    print(format_summary(result.summary))
    _write_result_json(args.result_json, {**result.to_json(), "workload": _workload_json(spec),
                                          "tokenizer": tokenizer_name})
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pagoda.bench.throughput import run_throughput_benchmark
    from pagoda.bench.workload import build_workload

    spec = _workload_spec(args)
    config = _engine_config(args)
    engine = _engine(args, config)
    if engine is None:
        return 0
    try:
        result = run_throughput_benchmark(engine, build_workload(spec, engine.tokenizer))
    finally:
        engine.shutdown()
    print(result.format())
    _write_result_json(args.result_json, {"engine": asdict(config), "workload": _workload_json(spec),
                                          "result": result.to_json()})
    return 0


def cmd_kernel_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from pagoda.model_store import resolve_model
    from pagoda.worker.model_loader import load_model

    config = _engine_config(args)
    if config.kernel_plan == "kernel":  # the default: this command is for measuring
        config = replace(config, kernel_plan="auto")
    if config.parallel.world_size > 1:
        raise SystemExit("pagoda kernel-plan measures one rank: run it with --threads-per-rank instead of -tp/-pp")
    if args.threads_per_rank:
        torch.set_num_threads(args.threads_per_rank)
    loaded = load_model(resolve_model(config.model), config, remeasure_kernels=not args.cached)
    print(loaded.kernel_plan.table())
    return 0


def _context(text: str) -> int:
    from pagoda.planner import CONTEXT_PRESETS

    if text in CONTEXT_PRESETS:
        return CONTEXT_PRESETS[text]
    try:
        value = int(text.lower().removesuffix("k")) * (1024 if text.lower().endswith("k") else 1)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 32768 or 32k) nor one of "
                                         f"{', '.join(CONTEXT_PRESETS)}")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from pagoda.planner import PlanError, format_plan, load_for_plan, plan

    try:
        config, stored, label = load_for_plan(args.model)
        result = plan(config, model=label, weights=None if args.precision else stored,
                      precision=args.precision or "bf16", kv_cache_dtype=args.kv_cache_dtype, context=args.context,
                      concurrency=args.concurrency, tp=args.tensor_parallel_size,
                      max_prefill_tokens=args.max_prefill_tokens, utilization=args.memory_utilization)
    except PlanError as exc:
        raise SystemExit(f"pagoda plan: {exc}") from None
    print(json.dumps(result.to_json(), indent=1) if args.json else format_plan(result))
    return 0


def _version() -> str:
    from pagoda import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from pagoda.tokenizer.reasoning import REASONING_PARSER_CHOICES

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
    p.add_argument("--max-request-bytes", default="2MiB",
                   help="larger request bodies get 413 before they are read, e.g. 8MiB (default: 2MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="after SIGTERM, seconds running requests may take to finish before they are ended "
                        "with an error (default: 30)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--reasoning-parser", default="auto", choices=REASONING_PARSER_CHOICES,
                   help="split <think>...</think> from chat answers into reasoning_content: qwen3, none, or auto "
                        "(default): qwen3 when the chat template has think tags or enable_thinking")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="interactive chat in the terminal, on a local engine or a server (--url)")
    _engine_args(p)
    p.add_argument("--url", default=None, help="talk to a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most (default: 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="(default: 0.7)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("kernel-plan", help="time the quantized layers' paths on this CPU and print the plan "
                                           "`serve` would use (measured afresh, and cached for the next start)")
    _engine_args(p)
    p.add_argument("--cached", action="store_true", help="print the cached plan when there is one")
    p.set_defaults(func=cmd_kernel_plan)
    p = sub.add_parser("plan", help="memory needed by a model at a context and concurrency, and the devices (and TP "
                                    "degree) that hold it; MODEL may be a config.json alone")
    p.add_argument("model", help="registry name (pulled), GGUF file, Hugging Face directory, or config.json")
    p.add_argument("--context", type=_context, default=8192,
                   help="tokens per request: a number (32768, 32k) or chat (8k), docs (128k), agent (256k); "
                        "default: 8192")
    p.add_argument("--concurrency", type=int, default=1, help="requests at their full context at once (default: 1)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "fp8", "int8", "int4"], default=None,
                   help="weights' precision (default: as stored in the model's files; bf16 for a config.json)")
    p.add_argument("--kv-cache-dtype", choices=["float32", "float16", "bfloat16", "int8", "fp8_e4m3", "fp8_e5m2"],
                   default="bfloat16",
                   help="(default: bfloat16)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="ranks to split over (default: 1)")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens per step (default: 512)")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of a device's memory a plan may use (default: 0.9)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks: load on a server, or the offline engine's throughput")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("serve", help="load-test any OpenAI-compatible server with streaming requests")
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", "-m", default=None, help="model name sent in the request body (default: none sent)")
    p.add_argument("--tokenizer", default=None,
                   help="registry name or path of the model whose tokenizer builds the prompts (default: --model, "
                        "else the default model)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="(default: /v1/completions)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: $PAGODA_API_KEY)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="requests per second, Poisson arrivals (default: all at once)")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate exactly max_tokens")
    p.add_argument("--new-connection-per-request", action="store_true",
                   help="a fresh HTTP connection per request instead of a keep-alive pool")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent first (default: 1)")
    _workload_args(p)
    p.set_defaults(func=cmd_bench_serve)

    p = bench_sub.add_parser("throughput", help="the offline engine's throughput, every request submitted at once")
    _engine_args(p)
    _workload_args(p)
    p.set_defaults(func=cmd_bench_throughput)
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
