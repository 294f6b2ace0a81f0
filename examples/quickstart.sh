#!/usr/bin/env bash
# The whole path on a fresh machine: set up, train a small Hydra on the built-in
# logic task, export it to an int8 bundle, and ask the bundle some questions.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/quickstart}
STEPS=${STEPS:-600}

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[train]"
mkdir -p "$OUT"

echo "== train hydra-tiny on implication chains ($STEPS steps)"
hydra-edge train --preset hydra-tiny --task logic --steps "$STEPS" --out "$OUT/logic.pt"

echo "== model summary"
hydra-edge info "$OUT/logic.pt"

echo "== export to an int8 bundle"
hydra-edge export "$OUT/logic.pt" --out "$OUT/logic-int8" --force

echo "== ask the bundle (onnxruntime, no torch)"
for query in "A->B.B->C.A->" "K->L.X->Y.L->M.K->" "P->Q.Q->R.R->S.P->"; do
    printf '%-22s answer: ' "$query"
    hydra-edge run "$OUT/logic-int8" --prompt "$query"
done
