"""Domain actors. Importing this package prepares MLX for the host (see _blas)."""

from actors import _blas

_blas.preload_openblas()
