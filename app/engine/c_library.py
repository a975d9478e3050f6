"""The C kernel as a library: its build and its ABI (native/row_kernels.c, loaded with ctypes).

It is compiled once per machine with the system C compiler (`cc`, or $CC) into a cache folder
($PIXELCNN_KERNEL_CACHE, else ~/.cache/pixelcnn/kernels, else the temp folder), keyed by the source, the
flags and the CPU, and loaded with ctypes, which releases the GIL during the call (the decode lanes run in
parallel). Flags: -O3 -march=native (the kernel is built where it runs), -ffp-contract=off and no
-ffast-math, so every sum runs in the written order with IEEE rounding, its products' running sums as
explicit fused multiply-adds (emulated exactly where the CPU has none, ~50x slower: logged): the vector
width changes the speed, never a number (NUMERICS_VERSION; README, "Reproducibility across machines").
When there is no
compiler, the build fails or PIXELCNN_NATIVE_KERNEL=0, `load_kernel()` returns None and the engine runs
the TorchScript decoder. The wrappers that call it live in c_kernel.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "row_kernels.c"
# The version of the kernel's numbers: bump it in any change to row_kernels.c that changes a number it
# computes (and regenerate tests/golden). 1: libm's log; 2: its own log, known rows through the kernel;
# 3: the products' running sums as fused multiply-adds (one rounding each instead of two).
NUMERICS_VERSION = 3
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-fPIC", "-shared", "-pthread"]


def flags() -> list[str]:
    """FLAGS and the target CPU: -march=native, or $PIXELCNN_KERNEL_MARCH (e.g. x86-64-v3: no AVX-512)
    for a kernel that must run on older CPUs than the build machine's, or to check that the vector width
    changes no number. On x86-64 the compiler's own loops (the gates, the draws' exponentials) use vectors
    as wide as the CPU's: GCC keeps them to 256 bits on AVX-512 CPUs by default, and 512 was 6-8% faster
    at batch 16 and 64 on an Intel Xeon (BENCHMARKS.md); a CPU without AVX-512 ignores it."""
    march = os.environ.get("PIXELCNN_KERNEL_MARCH", "").strip() or "native"
    wide = ["-mprefer-vector-width=512"] if platform.machine().lower() in {"x86_64", "amd64"} else []
    return [f"-march={march}", *FLAGS, *wide]


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


class GatedWeights(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int32),
        ("channels", ctypes.c_int32),
        ("image_channels", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("head", ctypes.c_int32),
        ("h_width", ctypes.POINTER(ctypes.c_int32)),
        ("in_channels", ctypes.POINTER(ctypes.c_int32)),
        ("h_weight", ctypes.POINTER(ctypes.c_void_p)),
        ("out_weight", ctypes.POINTER(ctypes.c_void_p)),
        ("out_bias", ctypes.POINTER(ctypes.c_void_p)),
        ("hidden_w", ctypes.c_void_p),
        ("hidden_b", ctypes.c_void_p),
        ("logits_w", ctypes.POINTER(ctypes.c_void_p)),
        ("logits_b", ctypes.POINTER(ctypes.c_void_p)),
    ]


class GatedVertical(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int32),
        ("channels", ctypes.c_int32),
        ("image_channels", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("v_rows", ctypes.POINTER(ctypes.c_int32)),
        ("v_width", ctypes.POINTER(ctypes.c_int32)),
        ("h_size", ctypes.POINTER(ctypes.c_int32)),
        ("v_weight", ctypes.POINTER(ctypes.c_void_p)),
        ("v_bias", ctypes.POINTER(ctypes.c_void_p)),
        ("link_weight", ctypes.POINTER(ctypes.c_void_p)),
        ("link_bias", ctypes.POINTER(ctypes.c_void_p)),
    ]


class PixelCNNWeights(ctypes.Structure):
    _fields_ = [
        ("blocks", ctypes.c_int32),
        ("channels", ctypes.c_int32),
        ("image_channels", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("head", ctypes.c_int32),
        ("in_half", ctypes.c_int32),
        ("half", ctypes.POINTER(ctypes.c_int32)),
        ("in_weight", ctypes.c_void_p),
        *(
            (name, ctypes.POINTER(ctypes.c_void_p))
            for name in ("conv_weight", "conv_bias", "reduce_weight", "reduce_bias", "expand_weight", "expand_bias")
        ),
        ("hidden_w", ctypes.c_void_p),
        ("hidden_b", ctypes.c_void_p),
        ("logits_w", ctypes.POINTER(ctypes.c_void_p)),
        ("logits_b", ctypes.POINTER(ctypes.c_void_p)),
    ]


def cache_folder() -> Path:
    configured = os.environ.get("PIXELCNN_KERNEL_CACHE")
    if configured:
        return Path(configured)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "pixelcnn" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))][:2]
    return platform.machine() + "\n" + "\n".join(lines)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build(compiler: str, source_file: Path = SOURCE) -> Path:
    """Compile the kernel (or another C file of native/, built alike: the benchmark's peak loop) once per
    source, flags, compiler and CPU, and return the shared library."""
    source = source_file.read_bytes()
    key = hashlib.sha256(source + " ".join(flags()).encode() + compiler.encode() + _cpu_signature().encode())
    name = f"{source_file.stem}-{key.hexdigest()[:16]}.so"
    for folder in (cache_folder(), Path(tempfile.gettempdir()) / "pixelcnn-kernels"):
        library = folder / name
        if library.exists():
            return library
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        # Build under a private name, then rename: processes starting together never load a half file.
        partial = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
        result = subprocess.run(
            [compiler, *flags(), str(source_file), "-o", str(partial), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
        return library
    raise RuntimeError(f"no writable folder for the kernel (tried {cache_folder()} and the temp folder)")


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None when it is switched off or cannot be built."""
    if os.environ.get("PIXELCNN_NATIVE_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "kernels" not in _loaded:
            _loaded["kernels"] = _load()
        return _loaded["kernels"]


def _load() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found (cc, gcc, clang): sampling runs the slower TorchScript decoder")
        return None
    try:
        library = _entry_points(ctypes.CDLL(str(build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("could not build the native row kernel (%s): sampling runs the TorchScript decoder", error)
        return None
    if not library.kernel_hardware_fma():
        log.warning(
            "this CPU has no fused multiply-add instruction: the C kernel emulates it exactly (the same bytes "
            "as everywhere) but draws ~50x slower; PIXELCNN_NATIVE_KERNEL=0 runs the TorchScript decoder "
            "instead (faster here, its seeded bytes this machine's own)"
        )
    return library


def load_kernel_source(source_file: Path) -> ctypes.CDLL:
    """Another version of the kernel's source, built and set up like the served one, for comparing the two
    side by side (`pixelcnn bench kernel`). RuntimeError without a compiler or when the build fails;
    AttributeError when the source lacks one of this version's entry points."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang)")
    return _entry_points(ctypes.CDLL(str(build(compiler, source_file))))


def _entry_points(library: ctypes.CDLL) -> ctypes.CDLL:
    """The kernel's functions' argument and result types, set on the loaded library."""
    library.kernel_panel_width.restype = ctypes.c_int
    pointer, pointers = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    library.gated_decode_row.restype = ctypes.c_int
    library.gated_decode_row.argtypes = [
        ctypes.POINTER(GatedWeights),
        ctypes.c_int32,
        pointers,
        pointers,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
    ]
    library.gated_begin_row.restype = ctypes.c_int
    library.gated_begin_row.argtypes = [ctypes.POINTER(GatedVertical), ctypes.c_int32, *[pointers] * 5]
    library.gated_end_row.restype = None
    library.gated_end_row.argtypes = [ctypes.POINTER(GatedVertical), ctypes.c_int32, pointer, pointer]
    library.pixelcnn_decode_row.restype = ctypes.c_int
    library.pixelcnn_decode_row.argtypes = [
        ctypes.POINTER(PixelCNNWeights),
        ctypes.c_int32,
        pointer,
        pointer,
        pointers,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
    ]
    library.gated_wavefront.restype = ctypes.c_int
    library.gated_wavefront.argtypes = [
        ctypes.POINTER(GatedWeights),
        ctypes.POINTER(GatedVertical),
        *[ctypes.c_int32] * 5,
        pointers,
        pointers,
        pointers,
        *[pointer] * 6,
    ]
    library.pixelcnn_wavefront.restype = ctypes.c_int
    library.pixelcnn_wavefront.argtypes = [
        ctypes.POINTER(PixelCNNWeights),
        *[ctypes.c_int32] * 3,
        pointer,
        pointer,
        pointers,
        *[pointer] * 6,
    ]
    library.wavefront_rows_wait.restype = ctypes.c_int32
    library.wavefront_rows_wait.argtypes = [pointer, ctypes.c_int32, ctypes.c_int32]
    library.wavefront_rows_publish.restype = None
    library.wavefront_rows_publish.argtypes = [pointer, ctypes.c_int32]
    return library
