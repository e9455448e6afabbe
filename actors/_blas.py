"""Load OpenBLAS before MLX on Linux.

The PyPI mlx-cpu wheel links a reference BLAS: a 1024x1024 float32 matmul takes
~350 ms with it and ~11 ms with OpenBLAS. Loading cmeel-openblas with RTLD_GLOBAL
before `import mlx` makes the dynamic linker resolve MLX's cblas_* calls to it.
On macOS MLX uses Accelerate/Metal and this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("greenroom.blas")
loaded: str | None = None


def _candidates() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])}
    return [r / "cmeel.prefix" / "lib" / "libopenblas.so.0" for r in roots]


def preload_openblas() -> str | None:
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get("GREENROOM_NO_OPENBLAS"):
        return loaded
    if "mlx.core" in sys.modules:
        log.warning("mlx was imported before OpenBLAS could be preloaded; CPU matmuls will be slow")
    for path in _candidates():
        if not path.exists():
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # usually libgfortran.so.5 missing: `apt-get install libgfortran5`
            log.warning("could not load %s (%s); CPU matmuls will be slow", path, exc)
            return None
        loaded = str(path)
        return loaded
    log.warning("cmeel-openblas not installed; CPU matmuls will be slow")
    return None
