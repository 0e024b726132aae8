"""Benchmarks: `pagoda bench serve` (a load generator for any OpenAI-compatible server) and `pagoda bench
throughput` (the offline engine, every request submitted at once).

workload.py builds the requests both send (synthetic prompts of an exact token count, or a JSONL / ShareGPT
dataset); stats.py turns per-request measurements into the summary; serve.py and throughput.py run them.
"""
