#!/usr/bin/env bash
# The main job, end to end on the built-in tiny model, as a user would run it:
# generate a two-stage project, install it, build its tiny OLMo-2 model (both engines load
# it), prepare the sample data (lengths measured with that model's tokenizer), train both
# stages with each backend, evaluate, export (adapters, merged, fused mlx q4, GGUF q8_0,
# with the GGUF loaded in llama.cpp when llama-cpp-python is installed), report the
# emissions CodeCarbon measured for each stage, show the runs, and run the project's own tests.
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
python -m pip install -q -e '.[mlx,transformers,evaluation,gguf,carbon,dashboard,dev]'

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

step "export: the transformers run's adapter in both formats, the mlx run merged for transformers, fused for mlx (q4), and as GGUF q8_0"
other=$(ls runs | grep demo-transformers | tail -1)
python scripts/export.py --run-id "$other" --stage 2 --format adapters
python scripts/export.py --run-id "$run" --stage 2 --format huggingface
python scripts/export.py --run-id "$run" --stage 2 --format mlx --quantization q4
python scripts/export.py --run-id "$run" --stage 2 --format gguf --quantization q8_0
gguf=$(ls exports/"$run"-stage2-gguf-q8_0/*.gguf)
python - "$gguf" "exports/$run-stage2-huggingface" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
merged = AutoModelForCausalLM.from_pretrained(sys.argv[2])
print("transformers, merged export, next token:", repr(tokenizer.decode(merged(__import__("torch").tensor([ids])).logits[0, -1].argmax())))
try:
    from llama_cpp import Llama
except ImportError:
    print("llama-cpp-python is not installed; skipping the GGUF load (pip install llama-cpp-python)")
else:
    llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    print("llama.cpp, GGUF q8_0 export, next token:", repr(tokenizer.decode(int(llm.scores[len(ids) - 1].argmax()))))
PY

step "carbon: the mlx run's emissions per stage (CodeCarbon, offline, this process only)"
python scripts/emissions_report.py --run-id "$run"

step "the runs"
python scripts/status.py
python -c "import json, sys; m = json.load(open(sys.argv[1])); print(json.dumps({k: {'status': v['status'], 'val_loss': [v['metrics']['val_loss_before'], v['metrics']['val_loss']], 'parent': v['parent_adapter']} for k, v in m['stages'].items()}, indent=1))" "runs/$run/run-manifest.json"
ls "runs/$run/stage2/adapters"

step "the project's own tests"
python -m pytest -q -p no:cacheprovider

step "done: $(pwd)"
