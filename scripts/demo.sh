#!/usr/bin/env bash
# The main job, end to end on the built-in tiny model, as a user would run it:
# generate a two-stage project, install it, build its tiny OLMo-2 model (both engines load
# it), prepare the sample data (lengths measured with that model's tokenizer), train both
# stages with each backend, evaluate, show the runs, and run the project's own tests. It
# grows as export lands.
#
#   bash scripts/demo.sh [DEST]     (default DEST: ./demo-project; must not exist)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-demo-project}
if [ -e "$dest" ]; then
    echo "demo: $dest already exists; pass a new directory" >&2
    exit 2
fi

step() { printf '\n== %s\n' "$*"; }

step "generate a project (default answers) from $here"
copier copy --defaults --trust --quiet --vcs-ref HEAD -d num_stages=2 "$here" "$dest"
cd "$dest"
ls

step "install it (torch is pinned to the CPU build first where that build is on disk)"
python -m pip install -q torch==2.13.0 2>/dev/null || true
python -m pip install -q -e '.[mlx,transformers,evaluation,dev]'

step "build the tiny model and check that transformers and mlx-lm load it"
python scripts/make_tiny_model.py

step "prepare the sample data"
OLMO_BASE_MODEL__LOCAL_PATH=models/tiny-olmo2 python scripts/prepare_dataset.py
python -c "import json; r = json.load(open('data/quality_reports/latest.json')); print('token lengths:', r['lengths']['total'])"

tiny=(--set base_model.local_path=models/tiny-olmo2 --set training.stage1.learning_rate=5e-3
      --set training.stage2.learning_rate=2e-3 --set training.stage1.iterations=60 --set training.stage2.iterations=40)
for backend in transformers mlx; do
    step "train both stages with $backend"
    python scripts/train.py --name "demo-$backend" --set training.backend=$backend "${tiny[@]}"
done

step "evaluate stage 2 of the mlx run (and the base model, and forgetting of stage 1)"
run=$(ls runs | grep demo-mlx | tail -1)
python scripts/evaluate.py --run-id "$run" --stage 2 --max-samples 20

step "the runs"
python scripts/status.py
python -c "import json, sys; m = json.load(open(sys.argv[1])); print(json.dumps({k: {'status': v['status'], 'val_loss': [v['metrics']['val_loss_before'], v['metrics']['val_loss']], 'parent': v['parent_adapter']} for k, v in m['stages'].items()}, indent=1))" "runs/$run/run-manifest.json"
ls "runs/$run/stage2/adapters"

step "the project's own tests"
python -m pytest -q -p no:cacheprovider

step "done: $(pwd)"
