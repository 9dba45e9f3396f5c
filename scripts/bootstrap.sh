#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install ckptstore with its test dependencies.
#
# torch: an installed torch >= 2.6 is kept as is. When torch is missing we install torch==${CKPTSTORE_TORCH:-2.13.0}
# *before* anything else, so that no dependency resolution pulls a multi-GB CUDA build: pip picks a local
# CPU wheel when one is on its find-links path (as on our CI machines), or the CPU wheel index given in
# CKPTSTORE_TORCH_INDEX_URL. Set CKPTSTORE_SKIP_TORCH=1 to manage torch yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${CKPTSTORE_EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

have_torch() {
  "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 6) else 1)
PYEOF
}

if [ "${CKPTSTORE_SKIP_TORCH:-0}" != "1" ] && ! have_torch; then
  spec="torch==${CKPTSTORE_TORCH:-2.13.0}"
  echo "bootstrap: installing $spec (CPU build preferred)"
  if [ -n "${CKPTSTORE_TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install "$spec" --index-url "$CKPTSTORE_TORCH_INDEX_URL"
  else
    "${PIP[@]}" install "$spec"
  fi
fi

# Re-install only when the dependency list changed (keeps repeated runs fast).
stamp="$VENV/.ckptstore-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import ckptstore" 2>/dev/null; then
  echo "bootstrap: installing ckptstore[$EXTRAS] (editable)"
  "${PIP[@]}" install -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torch, ckptstore; print(f'bootstrap: torch {torch.__version__}, ckptstore {ckptstore.__version__}')"
