#!/usr/bin/env bash
# Build the kvpress peer's own venv at <repo>/.venv-kvpress (never the project's .venv).
#
# kvpress 0.5.5 (NVIDIA/kvpress, PyPI) pins transformers < 5.3, the project runs 5.x newer than that,
# so the peer lives in its own venv and is driven by benchmarks/bench_kv.py through a subprocess.
# torch is installed FIRST and pinned (torch==2.13.0 is the CPU wheel on local disk); kvpress and
# its requirements are then installed with a constraints file holding that pin, so pip cannot swap in
# a CUDA build of torch. transformers 5.2.0 is the newest release kvpress 0.5.5 accepts.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${KVPRESS_VENV:-$root/.venv-kvpress}"
python="${PYTHON:-python3.11}"
torch_pin="torch==2.13.0"
kvpress_pin="kvpress==0.5.5"
transformers_pin="transformers==5.2.0"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
constraints="$venv/constraints-kvpress.txt"
printf '%s\n%s\n' "$torch_pin" "$transformers_pin" > "$constraints"
"$venv/bin/python" -m pip install --quiet "$torch_pin"
"$venv/bin/python" -m pip install --quiet -c "$constraints" "$kvpress_pin" "$transformers_pin"
"$venv/bin/python" - <<'PY'
import kvpress, torch, transformers
from importlib.metadata import version
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
print("kvpress", version("kvpress"), "transformers", transformers.__version__, "torch", torch.__version__)
PY
