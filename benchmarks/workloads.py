"""Run the standard workloads W1-W3 against one serving system, one at a time, with `pagoda bench serve`.

    .venv/bin/python benchmarks/workloads.py pagoda            # starts `pagoda serve`, runs W1-W3, stops it
    .venv/bin/python benchmarks/workloads.py vllm --hf-dir DIR # needs benchmarks/peers/setup_vllm.sh first
    .venv/bin/python benchmarks/workloads.py llamacpp          # needs benchmarks/peers/setup_llamacpp.sh first
    .venv/bin/python benchmarks/workloads.py pagoda --only W1 --runs 2

Results go to benchmarks/results/<system>-<workload>-run<k>.json (the full `bench serve` result), and
<system>-server.json: seconds from launch to ready, and the resident memory of the server's processes after
each workload.
Every workload: SmolLM2-135M-Instruct, greedy, ignore_eos, streaming completions, fixed output length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.servers import free_port, wait_healthy  # noqa: E402


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int


WORKLOADS = {
    "W1": Workload("W1", concurrency=1, num_prompts=8, input_len=128, output_len=128),
    "W2": Workload("W2", concurrency=16, num_prompts=64, input_len=256, output_len=128),
    "W3": Workload("W3", concurrency=64, num_prompts=128, input_len=512, output_len=256),
}


def server_command(system: str, port: int, args: argparse.Namespace) -> list[str]:
    peers = ROOT / "benchmarks" / "peers"
    if system == "pagoda":
        return [sys.executable, "-m", "pagoda.cli", "--log-level", "WARNING", "serve", args.model, "--port", str(port),
                "--served-model-name", "smollm2", *args.server_args]
    if system == "vllm":
        if not args.hf_dir:
            raise SystemExit("vllm needs --hf-dir (benchmarks/peers/export_hf.py writes one)")
        return ["bash", str(peers / "serve_vllm.sh"), args.hf_dir, str(port), *args.server_args]
    if system == "llamacpp":
        from pagoda.model_store import resolve_model

        return ["bash", str(peers / "serve_llamacpp.sh"), str(resolve_model(args.model)), str(port), *args.server_args]
    raise SystemExit(f"unknown system {system!r}")


def bench_command(url: str, workload: Workload, result: Path, args: argparse.Namespace, run: int) -> list[str]:
    return [sys.executable, "-m", "pagoda.cli", "bench", "serve", "--url", url, "--model", "smollm2",
            "--tokenizer", args.model, "--endpoint", "/v1/completions", "--ignore-eos",
            "--concurrency", str(workload.concurrency), "--num-prompts", str(workload.num_prompts),
            "--input-len", str(workload.input_len), "--output-len", str(workload.output_len),
            "--new-connection-per-request", "--result-json", str(result),
            # new prompts for every run and workload: the servers cache prefixes, and a repeated prompt (or the
            # same random start drawn for two workloads) would skip its prefill
            "--seed", str(100 * run + sorted(WORKLOADS).index(workload.name))]


def process_tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (vLLM runs its engine in a child process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["pagoda", "vllm", "llamacpp"])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name or GGUF path")
    parser.add_argument("--hf-dir", default=None, help="HF directory of the model (vLLM)")
    parser.add_argument("--only", nargs="*", default=sorted(WORKLOADS), help="workloads to run (default: all)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each workload (default: 2)")
    parser.add_argument("--first-run", type=int, default=1, help="number of the first run (to add runs later)")
    parser.add_argument("--label", default=None, help="result file prefix (default: the system name)")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra arguments for the server command (last on the line)")
    args = parser.parse_args()
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out_dir / f"{args.label or args.system}-server.log", "w")
    start = time.monotonic()
    server = subprocess.Popen(server_command(args.system, port, args), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, timeout=600, process=server)
        info = {"system": args.system, "server_args": args.server_args, "ready_s": time.monotonic() - start,
                "rss_ready_bytes": process_tree_rss(server.pid), "rss_after": {}}
        print(f"{args.system} ready in {info['ready_s']:.1f} s", flush=True)
        for run in range(args.first_run, args.first_run + args.runs):
            for name in args.only:
                result = out_dir / f"{args.label or args.system}-{name}-run{run}.json"
                print(f"== {args.system} {name} run {run}", flush=True)
                subprocess.run(bench_command(url, WORKLOADS[name], result, args, run), check=True)
                info["rss_after"][f"{name}-run{run}"] = process_tree_rss(server.pid)
        (out_dir / f"{args.label or args.system}-server.json").write_text(json.dumps(info, indent=2))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
