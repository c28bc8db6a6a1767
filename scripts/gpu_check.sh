#!/usr/bin/env bash
# The GPU check in one command: every figure of scripts/gpu_check.py, written to $OUT.
#
#   bash scripts/gpu_check.sh             # on a GPU machine, about 6 minutes on one H200
#   bash scripts/gpu_check.sh --dry-run   # on a CPU: tiny shapes, JAX_PLATFORMS=cpu
#   bash scripts/gpu_check.sh study       # the soft-partition study at 256 px (16 x 16
#                                         # maps), within 10 minutes: $OUT/study
#   bash scripts/gpu_check.sh study --dry-run
#
# It needs Python with jax (CUDA), flax, optax, orbax-checkpoint, numpy, torch and
# torchvision, and no network. Pure-Python packages the image lacks (ml-collections on
# a bare GPU image) are installed from wheels carried in .whl/ (ignored by git); fill it
# once where pip can download, e.g.
#     pip download ml-collections --no-deps -d .whl
# and carry .whl/ with the checkout (a few hundred KiB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-workdirs/gpu_check}"

# module -> distribution, for what the check imports beyond jax/flax/optax/orbax/torch.
missing=$("$PYTHON" - <<'PY'
import importlib.util
needed = {"ml_collections": "ml-collections", "absl": "absl-py", "yaml": "PyYAML",
          "etils": "etils"}
print(" ".join(d for m, d in needed.items() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "error: this Python lacks: $missing; and .whl/ holds no wheels. Where pip can" >&2
    echo "download, run:  pip download $missing --no-deps -d .whl   and carry .whl/ here." >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/musp_jax_site"
  echo "installing from .whl/: $missing"
  # shellcheck disable=SC2086  # one argument per distribution
  "$PYTHON" -m pip install -q --no-index --no-deps --find-links .whl --target "$site" $missing
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "study" ]; then
  shift
  # scripts/ablation.py on the numerical core (README, "Synthetic vehicles": the study):
  # pretraining, then the baseline and MUSP n = 5 seed by seed, then n = 3, 2 and ESE
  # off; no run starts after --deadline minutes, the tables are written after each run.
  exec "$PYTHON" scripts/ablation.py --runner core --workdir "$OUT/study" \
    --config parts,study --set 'input.image_size=(256,256)' \
    --pretrain_set 'input.image_size=(256,256)' --scale 1 --pretrain_scale 1 \
    --seeds 3 --deadline 6 "$@"
fi
exec "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@"
