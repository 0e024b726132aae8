"""Turn benchmarks/results/*.json into the tables and plots of BENCHMARKS.md.

    .venv/bin/python benchmarks/report.py   # needs the `bench` extra (matplotlib)

Reads what run_all.sh wrote; every workload figure is the median over its runs (the run count is shown).
Writes the plots to benchmarks/plots/*.png and replaces the text between the `<!-- report:begin -->` and
`<!-- report:end -->` markers of BENCHMARKS.md with the generated tables.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "benchmarks" / "plots"
DOC = ROOT / "BENCHMARKS.md"

# result-file label -> system shown (a system's W3 may come from a separate server launch)
SYSTEMS = {
    "pagoda": "Pagoda (default: GGUF blocks + native stack)",
    "pagoda-w1": "Pagoda (default: GGUF blocks + native stack)",
    "llamacpp": "llama-server (Q4_1, 16 slots)",
    "llamacpp-w1": "llama-server (Q4_1, 16 slots)",
    "llamacpp-w3": "llama-server (Q4_1, 16 slots)",
    "vllm-fp32": "vLLM CPU 0.32 (fp32)",
    "vllm-fp32-w3": "vLLM CPU 0.32 (fp32)",
}
WORKLOADS = {"W1": 1, "W2": 16, "W3": 64}  # name -> concurrency
RUN_FILE = re.compile(r"^(?P<label>.+)-(?P<workload>W[123])-run(?P<run>\d+)\.json$")


def load_runs() -> dict[str, dict[str, list[dict]]]:
    """system -> workload -> bench serve results (one per run)."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(RESULTS.glob("*-W?-run*.json")):
        m = RUN_FILE.match(path.name)
        if m and m["label"] in SYSTEMS:
            runs.setdefault(SYSTEMS[m["label"]], {}).setdefault(m["workload"], []).append(json.loads(path.read_text()))
    return runs


def median(results: list[dict], key: str, stat: str | None = None) -> float:
    values = [r["summary"][key] if stat is None else r["summary"][key][stat] for r in results]
    return statistics.median(values)


def workload_table(runs) -> str:
    lines = ["| system | workload | runs | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for workload in WORKLOADS:
        for system, per_workload in runs.items():
            results = per_workload.get(workload)
            if not results:
                continue
            failed = sum(r["summary"]["failed"] for r in results)
            lines.append(f"| {system} | {workload} | {len(results)} | {median(results, 'output_throughput'):.1f} | "
                         f"{median(results, 'ttft_ms', 'p50') / 1000:.2f} s | "
                         f"{median(results, 'ttft_ms', 'p99') / 1000:.2f} s | "
                         f"{median(results, 'tpot_ms', 'p50'):.1f} ms | {failed} |")
    return "\n".join(lines)


def ratio_table(runs) -> str:
    """Pagoda against each peer: the issue's targets are >= 1.5x llama-server on W1, and on W2/W3 >= 1.5x vLLM
    with TTFT p50 at most half of vLLM's."""
    ours = runs.get(SYSTEMS["pagoda"], {})
    llama, vllm = runs.get(SYSTEMS["llamacpp"], {}), runs.get(SYSTEMS["vllm-fp32"], {})
    lines = ["| workload | Pagoda tok/s | vs llama-server | vs vLLM (fp32) | TTFT p50 vs llama-server | "
             "TTFT p50 vs vLLM |", "|---|---|---|---|---|---|"]
    for workload in WORKLOADS:
        if workload not in ours:
            continue
        mine, cells = median(ours[workload], "output_throughput"), []
        for peer in (llama, vllm):
            cells.append(f"{mine / median(peer[workload], 'output_throughput'):.2f}x" if workload in peer else "-")
        for peer in (llama, vllm):
            cells.append(f"{median(ours[workload], 'ttft_ms', 'p50') / median(peer[workload], 'ttft_ms', 'p50'):.2f}x"
                         if workload in peer else "-")
        lines.append(f"| {workload} | {mine:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The KV cache each server was given: Pagoda's --kv-cache-memory, vLLM's VLLM_CPU_KVCACHE_SPACE (4 GiB in
# serve_vllm.sh), llama-server's 16 slots x 4096 tokens x 30 layers x (K + V: 3 heads x 64) x 2 bytes (f16).
KV_BUDGET_BYTES = {"llamacpp": 16 * 4096 * 30 * 384 * 2, "vllm": 4 * 2**30}


def kv_budget(info: dict) -> int | None:
    if info["system"] == "pagoda":
        args = info["server_args"]
        if "--kv-cache-memory" in args:
            value = args[args.index("--kv-cache-memory") + 1]
            return int(float(value.removesuffix("GiB")) * 2**30) if value.endswith("GiB") else None
        return 2 * 2**30  # pagoda serve's default
    return KV_BUDGET_BYTES.get(info["system"])


def server_table() -> str:
    lines = ["| system | launch to ready | KV cache budget | RSS when ready | RSS after the last workload | "
             "RSS beyond the KV budget (after) | server arguments |", "|---|---|---|---|---|---|---|"]
    for label, system in SYSTEMS.items():
        path = RESULTS / f"{label}-server.json"
        if not path.exists():
            continue
        info = json.loads(path.read_text())
        last = list(info["rss_after"].values())[-1] if info["rss_after"] else info["rss_ready_bytes"]
        budget = kv_budget(info)
        beyond = f"{(last - budget) / 2**30:.2f} GiB" if budget else "-"
        lines.append(f"| {system} ({label}) | {info['ready_s']:.1f} s | "
                     f"{budget / 2**30 if budget else 0:.2f} GiB | {info['rss_ready_bytes'] / 2**30:.2f} GiB | "
                     f"{last / 2**30:.2f} GiB | {beyond} | `{' '.join(info['server_args'])}` |")
    return "\n".join(lines)


def plots(runs) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    made = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, per_workload in runs.items():
        points = [(WORKLOADS[w], median(r, "output_throughput")) for w, r in sorted(per_workload.items())]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(WORKLOADS.values()), [f"{c}\n({w})" for w, c in WORKLOADS.items()])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s (median of runs)")
    ax.set_title("Throughput vs concurrency, SmolLM2-135M, 2 cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOTS / "throughput_vs_concurrency.png", dpi=110)
    made.append("throughput_vs_concurrency.png")
    plt.close(fig)
    for key, label in (("ttft", "TTFT (s)"), ("tpot", "TPOT (ms)")):
        fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(11, 3.6))
        for ax, workload in zip(axes, WORKLOADS):
            data, names = [], []
            for system, per_workload in runs.items():
                if workload in per_workload:
                    scale = 1000 if key == "tpot" else 1
                    data.append([req[key] * scale for r in per_workload[workload] for req in r["requests"]
                                 if req["success"] and req.get(key) is not None])
                    names.append(system.split(" (")[0])
            ax.boxplot(data, tick_labels=names, showfliers=False)
            ax.set_title(workload)
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{label} per request, all runs")
        fig.tight_layout()
        fig.savefig(PLOTS / f"{key}_distribution.png", dpi=110)
        made.append(f"{key}_distribution.png")
        plt.close(fig)
    return made


def optional(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def extras_tables() -> str:
    parts = []
    ceilings = optional("ceilings.json")
    if ceilings:
        rates = ", ".join(f"{shape}: {v:.0f}" for shape, v in ceilings["matmul_gflop_s"].items())
        parts.append(f"Machine ceilings (benchmarks/ceilings.py, {ceilings['threads']} threads): memory read "
                     f"bandwidth **{ceilings['read_bandwidth_gb_s']:.1f} GB/s**; torch matmul GFLOP/s: {rates}.")
    batching = optional("batching.json")
    if batching:
        med = batching["median"]
        parts.append("Continuous vs static batching (benchmarks/batching.py: same engine, "
                     f"{batching['num_requests']} requests, {batching['prompt_len']}-token prompts, output lengths "
                     f"uniform in {batching['output_len_range']}, at most {batching['batch']} at once, median of "
                     f"{len(batching['runs']['static'])} runs):\n\n"
                     "| batching | output tok/s | wall time | mean request latency | engine steps |\n"
                     "|---|---|---|---|---|\n"
                     + "\n".join(f"| {mode} | {m['output_tok_s']:.1f} | {m['seconds']:.1f} s | "
                                 f"{m['mean_latency_s']:.1f} s | {m['steps']:.0f} |" for mode, m in med.items()))
    kv = optional("kv_capacity.json")
    if kv:
        parts.append("Paged vs contiguous KV allocation (benchmarks/kv_capacity.py: KV memory for "
                     f"{kv['kv_tokens']:,} "
                     f"tokens = {kv['kv_bytes'] / 2**20:.0f} MiB, requests of {kv['request_tokens']} tokens):\n\n"
                     "| allocation | requests running at once |\n|---|---|\n"
                     f"| contiguous, reserving a {kv['window']:,}-token window per request | "
                     f"{kv['contiguous_at_window']} |\n"
                     f"| contiguous, 8,192-token window | {kv['contiguous_at_8k_window']} |\n"
                     f"| paged (16-token blocks), measured peak | **{kv['paged_peak_running']}** "
                     f"(ideal {kv['paged_ideal']}; {kv['preemptions']} preemptions) |")
    hf = optional("hf_baseline.json")
    if hf:
        parts.append(f"Hugging Face transformers {hf['transformers']} `generate`, static batches, fp32, offline "
                     "(benchmarks/hf_baseline.py): "
                     + "; ".join(f"{w}-shaped: **{hf[w]['output_tok_s']:.1f}** output tok/s (batch {hf[w]['batch']})"
                                 for w in ("W1", "W2") if w in hf) + ".")
    return "\n\n".join(parts)


def main() -> None:
    runs = load_runs()
    made = plots(runs) if runs else []
    text = "\n\n".join([
        "### Side by side (median of runs; `pagoda bench serve`, streaming completions, greedy, ignore_eos)",
        workload_table(runs),
        "### Pagoda against each peer (ratios of medians)",
        ratio_table(runs),
        "### Start-up and memory",
        server_table(),
        "### Plots",
        "\n".join(f"![{name}](benchmarks/plots/{name})" for name in made),
        "### Batching, KV allocation, transformers baseline, ceilings",
        extras_tables(),
    ])
    (RESULTS / "report.md").write_text(text + "\n")
    doc = DOC.read_text()
    begin, end = "<!-- report:begin -->", "<!-- report:end -->"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        DOC.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
    print(text)


if __name__ == "__main__":
    main()
