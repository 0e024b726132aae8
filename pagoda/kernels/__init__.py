"""Native CPU kernels: small C++ files compiled on first use with the system compiler and loaded with ctypes.

Why not a torch C++ extension: these kernels take raw pointers and sizes, so they need no torch headers; a
plain `g++ -O3 -march=native -fopenmp -shared` build takes a second or two instead of a minute, and the result
is cached under the model store (`$PAGODA_HOME/kernels/<name>-<hash>.so`), keyed by every source of this
directory (a kernel may include another), the flags, the compiler and the target `-march=native` resolves to on
this CPU, so a warm start compiles nothing. A model store may be shared with another machine (an NFS home, a
container image, a CI cache), so the key alone is not trusted: every library carries a marker (kernel_abi.h) with
its target and ABI version, read from the file before it is loaded; a library built for anything else is rebuilt,
never loaded (its instructions might not exist here: SIGILL).

`load(name)` returns the ctypes library, or raises KernelBuildError with the compiler's message; callers
decide whether to fall back to a torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("pagoda")

SOURCE_DIR = Path(__file__).parent
CXXFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=fast"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded (no compiler, or a compile error)."""


# Instruction-set extensions that decide what `-march=native` emits and what the kernels can use.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def host_isa() -> str:
    """The ISA extensions of this CPU that the kernels care about, e.g. "avx2+fma+f16c" ("" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return "+".join(flag for flag in ISA_FLAGS if flag in flags)


# The version of the kernels' C interface (signatures, shared structs). Bump it with any such change: a library
# of another version is rebuilt.
ABI_VERSION = 4
_MARKER = re.compile(rb"PAGODA_KERNEL\[target=([0-9a-f]+);abi=([0-9]+)\]")
_target_cache: dict[str, str] = {}


def native_target(cxx: str) -> str:
    """What `-march=native` resolves to with this compiler on this CPU: a digest of the macros it predefines
    (__AVX2__, __AVX512F__, __AMX_TILE__, ...), which decide the instructions the kernels are compiled to."""
    if cxx not in _target_cache:
        result = subprocess.run([cxx, "-march=native", "-E", "-dM", "-x", "c++", os.devnull], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"{cxx} cannot resolve -march=native: {result.stderr[-2000:]}")
        macros = "\n".join(sorted(result.stdout.splitlines()))
        _target_cache[cxx] = hashlib.sha256(macros.encode()).hexdigest()[:16]
    return _target_cache[cxx]


def library_marker(path: Path) -> tuple[str, int] | None:
    """The (target, ABI version) a library was built for, read from its bytes (None: not one of ours)."""
    found = _MARKER.search(path.read_bytes())
    return None if found is None else (found.group(1).decode(), int(found.group(2)))


def _cache_dir() -> Path:
    home = Path(os.environ.get("PAGODA_HOME", Path.home() / ".cache" / "pagoda"))
    return home / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX)")
    return cxx


def _sources() -> bytes:
    return b"".join(path.read_bytes() for path in sorted([*SOURCE_DIR.glob("*.cpp"), *SOURCE_DIR.glob("*.h")]))


def source_digest() -> str:
    """A digest of the kernels' sources: what a measurement of their speed (the kernel plan) depends on."""
    return hashlib.sha256(_sources()).hexdigest()[:16]


def load(name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (once, cached) and load pagoda/kernels/<name>.cpp. `defines`: extra preprocessor macros, e.g.
    ("PAGODA_NO_VNNI",) for the AVX2 baseline of a kernel that has faster variants (tests compare them)."""
    with _lock:
        loaded_key = name if not defines else f"{name}[{','.join(defines)}]"
        if loaded_key in _loaded:
            return _loaded[loaded_key]
        source = SOURCE_DIR / f"{name}.cpp"
        cxx = _compiler()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
        sources = _sources()
        # The resolved target is part of the key: `-march=native` on one CPU may emit instructions another lacks.
        cpu = native_target(cxx)
        flags = [*CXXFLAGS, f'-DPAGODA_KERNEL_TARGET="{cpu}"', f"-DPAGODA_KERNEL_ABI={ABI_VERSION}",
                 *(f"-D{d}" for d in defines)]
        key = hashlib.sha256(sources + " ".join([cxx, *flags, version]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"{name}-{key}.so"
        found = library_marker(target) if target.exists() else None
        if target.exists() and found != (cpu, ABI_VERSION):
            logger.warning("kernel %s was built for another target or ABI (%s, here %s): rebuilding", target.name,
                           found, (cpu, ABI_VERSION))
            target.unlink(missing_ok=True)  # a concurrent loader may have removed it already
        if not target.exists():
            _build(cxx, flags, source, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError as exc:
            raise KernelBuildError(f"loading {target} failed: {exc}") from exc
        _loaded[loaded_key] = library
        return library


def _build(cxx: str, flags: list[str], source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([cxx, *flags, f"-I{SOURCE_DIR}", str(source), "-o", str(built)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed:\n{result.stderr[-4000:]}")
        os.replace(built, target)  # atomic: concurrent builders never load a half-written file
    logger.info("compiled kernel %s -> %s", source.name, target)
