"""Pagoda: an LLM serving engine for CPUs. `from pagoda import LLM, SamplingParams`."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `import pagoda.core...` (and the CLI's --help) stay light.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pagoda.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
