"""`python -m mlx_lm.server` with OpenBLAS loaded first (the benchmarks' baseline).

On Linux the PyPI mlx-cpu wheel links a reference BLAS that makes float32 matmuls
~30x slower; greenroom loads OpenBLAS before importing mlx (actors/_blas.py). For a
fair comparison mlx_lm.server gets exactly the same treatment: this wrapper loads
OpenBLAS the same way, then runs mlx_lm.server's own main() with the given args.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import _blas  # noqa: E402

if __name__ == "__main__":
    if _blas.preload_openblas() is None and sys.platform.startswith("linux"):
        print("warning: OpenBLAS not loaded; mlx_lm.server will be slow", file=sys.stderr)
    from mlx_lm.server import main

    main()
