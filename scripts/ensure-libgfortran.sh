#!/bin/sh
# cmeel-openblas (the fast BLAS greenroom preloads on Linux) needs libgfortran.so.5.
# Without it greenroom still runs, on MLX's ~30x slower reference BLAS.
[ "$(uname -s)" = Linux ] || exit 0
ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5' && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing libgfortran5 for OpenBLAS"
    (apt-get install -y -qq libgfortran5 >/dev/null 2>&1 ||
        (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libgfortran5 >/dev/null 2>&1)) && exit 0
fi
echo "warning: libgfortran.so.5 not found; install it (e.g. apt-get install libgfortran5) for fast CPU inference" >&2
exit 0
