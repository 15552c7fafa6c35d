#!/usr/bin/env bash
# Install nanoseek (editable) into the current Python, reusing an installed torch.
#   ./setup.sh        runtime dependencies
#   ./setup.sh test   plus the test extra (pytest, transformers, peft)
# An installed torch >= 2.10 (CPU or CUDA) is kept as is. Without one we ask for the pinned CPU build,
# because an open-ended torch requirement would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 10))' 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install -q -e ".${extra}"
