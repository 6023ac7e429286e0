# Sourced by the benchmarks against transformers, after REF is set. Debian's torch 1.13
# multiplies with Debian's OpenBLAS 0.3.21, which runs its SSE3 kernels ("Prescott") on a
# CPU newer than it knows (seen: a Xeon reporting family 6 model 207): a baseline several
# times slower than the CPU allows. Unless OPENBLAS_CORETYPE is set, that fallback is
# replaced by the kernels the CPU's flags allow; the core used is printed either way.
openblas_core() { # the core name OpenBLAS picks in the reference environment, or "not OpenBLAS"
  # shellcheck disable=SC1091
  (source "$REF/env.sh" && python3 - <<'PY'
import ctypes
import torch  # noqa: F401 (loads the BLAS torch multiplies with)
try:
    name = ctypes.CDLL("libblas.so.3").openblas_get_corename
except (OSError, AttributeError):
    print("not OpenBLAS")
else:
    name.restype = ctypes.c_char_p
    print(name().decode())
PY
  )
}
OPENBLAS_PICKED=$(openblas_core)
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  case $OPENBLAS_PICKED in
    Prescott | Core2 | Penryn | Dunnington | Nehalem | Barcelona)
      FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo) "
      if [[ $FLAGS == *" avx512f "* && $FLAGS == *" avx512bw "* && $FLAGS == *" avx512dq "* && $FLAGS == *" avx512vl "* ]]; then
        export OPENBLAS_CORETYPE=SkylakeX
      elif [[ $FLAGS == *" avx2 "* && $FLAGS == *" fma "* ]]; then
        export OPENBLAS_CORETYPE=Haswell
      fi
      ;;
  esac
fi
if [ -n "${OPENBLAS_CORETYPE:-}" ]; then
  echo "transformers' BLAS: OpenBLAS core $(openblas_core) (OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE; detected: $OPENBLAS_PICKED)"
else
  echo "transformers' BLAS: OpenBLAS core $OPENBLAS_PICKED (as detected)"
fi
