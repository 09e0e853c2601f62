"""DPO: the generated project's transformers backend vs TRL's DPOTrainer on the same pairs.

    python bench/dpo_vs_trl.py [--real] [--steps 10] [--repeats 2] [--batch 4]

Both sides train LoRA (rank 8, scale 2 on q, k, v, o; no dropout) with DPO (beta 0.1, TRL's
`sigmoid` loss) at a constant learning rate, on the very same pairs in the same order (TRL's
sampler is given the project's batch indices): synthetic prompts of widely varying length, the
chosen answer and another row's answer as the rejected one. The reference is the base model on
both sides (TRL: the adapter disabled, one extra forward per step; the project: the adapter as
the stage starts, its log-probabilities computed once before the first step). The project's
throughput is counted over its training loop plus that reference pass, so both pay for it.

Throughput is real tokens (prompt + answer, chosen and rejected) per second; memory is each
process's peak resident set; MFU uses 4N FLOPs per trained token plus 2N per reference token
against the float32 matmul rate measured here.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import tempfile
from pathlib import Path

from common import TRAIN_AND_MEASURE, bench_project, check_precision, median, parser, project_args, run
from transformers_vs_trainer import matmul_peak

LEARNING_RATE = 5e-5

TRL_SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model_dir, data_file, out, steps, batch, lr, seed, precision = sys.argv[1:9]
sys.path.insert(0, ".")
from trainer.data.training_data import Sampler

records = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
rows = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
sampler = Sampler([(np.ones(len(rows)), 1.0)], int(batch), int(seed), 1)
order = [int(i) for step in range(1, int(steps) + 1) for i in sampler.batch(step, 0)]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
config = DPOConfig(output_dir=out, beta=0.1, per_device_train_batch_size=int(batch), max_steps=int(steps),
                   learning_rate=float(lr), lr_scheduler_type="constant", warmup_steps=0, max_length=512,
                   gradient_checkpointing=False, logging_steps=1000, save_strategy="no", report_to=[],
                   use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=int(seed),
                   bf16=precision == "bf16")  # TRL's default: True


class SameBatches(DPOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return order


trainer = SameBatches(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
data = trainer.train_dataset
tokens = sum(2 * len(data[i]["prompt_ids"]) + len(data[i]["chosen_ids"]) + len(data[i]["rejected_ids"])
             for i in order)
''' + TRAIN_AND_MEASURE + r'''
print(json.dumps({"tokens": tokens, "seconds": metrics["train_runtime"], "matmul_dtypes": sorted(matmuls),
                  "tokens_per_second": tokens / metrics["train_runtime"], "peak_gb": peak / 1e6}))
'''


def pairs_of(project: Path) -> None:
    """Turn the prepared chat rows into pairs: each row's answer is chosen, another row's rejected."""
    rng = random.Random(0)
    for split in ("train", "valid", "test"):
        path = project / "data" / "processed" / f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        answers = [r["messages"][-1]["content"] for r in records]
        for record in records:
            other = rng.choice(answers)
            record["rejected"] = other if other != record["messages"][-1]["content"] else "I do not know."
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    cli = parser(__doc__, steps=10, batch=4)
    cli.set_defaults(rows=50)  # about as many training pairs as the run draws: the reference pass covers each once
    args = cli.parse_args()
    import torch

    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        project, model, summary = bench_project(Path(tmp), "transformers", args.rows, real=args.real)
        pairs_of(project)
        n_matmul = summary["parameters"] - summary["vocab_size"] * summary["hidden_size"] * (0 if args.real else 1)
        data_file = project / "data" / "processed" / "train.jsonl"
        ours_args = [sys.executable, "scripts/train.py", "--json", "--name", "dpo",
                     *project_args(args.steps, args.batch, LEARNING_RATE, args.precision),
                     "--set", "training.stage1.method=dpo", "--set", "training.stage1.beta=0.1",
                     "--set", "training.quality_weighting=false"]
        trl_args = [sys.executable, "-c", TRL_SCRIPT, str(model), str(data_file), str(Path(tmp) / "trl"),
                    str(args.steps), str(args.batch), str(LEARNING_RATE), "42", args.precision]
        ours, theirs = [], []
        for repeat in range(args.repeats):
            out = run(ours_args, project)
            stage = out["stages"]["stage1"]
            metadata = json.loads((Path(out["manifest_path"]).parent / "stage1" / "training_metadata.json")
                                  .read_text())
            reference = metadata["method"]["reference"]
            ours.append({"tokens_per_second": stage["tokens"] / (stage["seconds"] + reference["seconds"]),
                         "loop_only": stage["tokens_per_second"], "reference_seconds": reference["seconds"],
                         "reference_pairs": reference["pairs"], "peak_gb": stage["peak_memory_gb"]})
            theirs.append(run(trl_args, project))
            check_precision("project DPO", args.precision, out)  # never compare different precisions
            check_precision("TRL DPOTrainer", args.precision, theirs[-1])
            print(f"  repeat {repeat + 1}: project {ours[-1]['tokens_per_second']:.0f} tok/s "
                  f"(loop {ours[-1]['loop_only']:.0f}, reference pass {reference['seconds']:.1f} s for "
                  f"{reference['pairs']} pairs), TRL DPOTrainer {theirs[-1]['tokens_per_second']:.0f}")
        peak = matmul_peak(precision=args.precision)

    print(f"\nmodel: {summary['model']}, {summary['parameters'] / 1e6:.1f}M parameters, batch {args.batch} pairs, "
          f"{args.steps} steps x {args.repeats} alternating runs, {args.rows} rows")
    print(f"{'':22}{'tokens/s':>10}{'peak GB':>9}{'MFU':>8}")
    for name, values in (("project DPO", ours), ("TRL DPOTrainer", theirs)):
        tps = median(values, "tokens_per_second")
        # 4N per trained token and 2N per reference token: 6N per pair token on both sides
        print(f"{name:22}{tps:>10.0f}{median(values, 'peak_gb'):>9.2f}{6 * n_matmul * tps / peak:>8.1%}")
    print(f"ratio (project / TRL): {median(ours, 'tokens_per_second') / median(theirs, 'tokens_per_second'):.2f}x")
    print(f"measured {args.precision} matmul peak: {peak / 1e9:.1f} GFLOP/s (2048x2048, best of 10)")


if __name__ == "__main__":
    main()
