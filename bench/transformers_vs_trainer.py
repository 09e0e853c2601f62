"""The generated project's transformers backend vs a plain Hugging Face Trainer + peft script,
and model FLOPs utilisation against this machine's measured matmul peak.

    python bench/transformers_vs_trainer.py [--steps 20] [--repeats 3] [--batch 8]

Both sides train the same locally built Llama-architecture model (about 24M parameters,
random weights, its tokenizer trained on the data) with the same LoRA (rank 8 on q, k, v, o;
scale 2), learning rate, batch size and variable-length chat data with the prompt masked, on
the same number of threads. Runs alternate (ours, theirs, ours, ...) and the medians are
reported. Both see the very same batches (the Trainer's sampler is given the project's batch
indices), so only the engines differ. Throughput is real (unpadded) tokens per second: the
project's own report for the backend; for the Trainer, the tokens its collator produced over
`train_runtime`. Memory is each process's peak resident set (VmHWM). A third row runs the
project with `training.length_grouping` (batches cut from a length-sorted draw: the same
weighted rows with far less padding) against the same Trainer baseline.

MFU uses the LoRA convention of 4N FLOPs per token (forward 2N, backward through the frozen
weights 2N, no weight gradients), with N the parameters that take part in matmuls (all but
the input embedding), against the matmul rate measured here at the run's precision.

`--precision bf16` runs every side with bfloat16 matmuls under autocast and float32 weights
(the project's training.precision bf16, the Trainer's and TRL's bf16=True). TRL's configs
default to bf16=True, so both settings are passed explicitly, and each side reports what it
ran: the Trainer and TRL the dtype their first q_proj's frozen matmul produced, the project its
training metadata; the benchmark stops if any differs from the precision asked for.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

from common import TRAIN_AND_MEASURE, bench_project, check_precision, median, parser, project_args, run

LEARNING_RATE = 2e-4
GROUP = 8  # training.length_grouping for the padding-free row: 8 batches drawn together, cut by length

TRAINER_SCRIPT = r'''
import json, sys, time
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

model_dir, data_file, out, steps, batch, lr, seed, precision = sys.argv[1:9]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
rows = []
for line in Path(data_file).read_text().splitlines():
    messages = json.loads(line)["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:512]
    cut = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * cut + ids[cut:]})
model = AutoModelForCausalLM.from_pretrained(model_dir)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         task_type="CAUSAL_LM"))
padding = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
seen = {"tokens": 0}

def collate(features):
    batch = padding(features)
    seen["tokens"] += int(batch["attention_mask"].sum())
    return batch

args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps),
                         learning_rate=float(lr), lr_scheduler_type="constant", warmup_steps=0,
                         logging_steps=int(steps), save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
                         bf16=precision == "bf16")
# The same batches as the project's run: its sampler's indices (seed, stage 1, iteration, micro 0),
# consecutive groups of `batch` for the Trainer's dataloader, so only the engines differ.
sys.path.insert(0, ".")
import numpy as np
from trainer.data.training_data import Sampler
sampler = Sampler([(np.ones(len(rows)), 1.0)], int(batch), int(seed), 1)
order = [int(i) for step in range(1, int(steps) + 1) for i in sampler.batch(step, 0)]


class SameBatches(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return order


trainer = SameBatches(model=model, args=args, train_dataset=rows, data_collator=collate)
''' + TRAIN_AND_MEASURE + r'''
print(json.dumps({"tokens": seen["tokens"], "seconds": metrics["train_runtime"], "matmul_dtypes": sorted(matmuls),
                  "tokens_per_second": seen["tokens"] / metrics["train_runtime"], "peak_gb": peak / 1e6}))
'''


TRL_SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_dir, data_file, out, steps, batch, lr, seed, precision = sys.argv[1:9]
sys.path.insert(0, ".")
from trainer.data.training_data import Sampler

records = [json.loads(line)["messages"] for line in Path(data_file).read_text().splitlines()]
# the very rows the project's run draws (seed, stage 1, iterations 1..steps), as prompt-completion
# pairs, so TRL packs (best-fit decreasing, padding-free) and trains on the same tokens
sampler = Sampler([(np.ones(len(records)), 1.0)], int(batch), int(seed), 1)
rows = [{"prompt": records[int(i)][:-1], "completion": records[int(i)][-1:]}
        for step in range(1, int(steps) + 1) for i in sampler.batch(step, 0)]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
config = SFTConfig(output_dir=out, packing=True, packing_strategy="bfd", max_length=512,
                   per_device_train_batch_size=2, num_train_epochs=1, learning_rate=float(lr),
                   lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=False,
                   logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                   dataloader_num_workers=0, seed=int(seed), bf16=precision == "bf16")  # TRL's default: True
trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
''' + TRAIN_AND_MEASURE + r'''
print(json.dumps({"tokens": tokens, "seconds": metrics["train_runtime"], "blocks": len(trainer.train_dataset),
                  "matmul_dtypes": sorted(matmuls),
                  "tokens_per_second": tokens / metrics["train_runtime"], "peak_gb": peak / 1e6}))
'''


def matmul_peak(size: int = 2048, repeats: int = 10, precision: str = "float32") -> float:
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def main() -> None:
    cli = parser(__doc__, steps=20, batch=8)
    cli.add_argument("--grouped", action="store_true", help=f"also the project with length_grouping {GROUP}")
    args = cli.parse_args()
    import torch

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        project, model, summary = bench_project(Path(tmp), "transformers", args.rows, real=args.real)
        n_params = summary["parameters"]
        # the input embedding is a lookup; a tied output layer still multiplies (counted once more)
        n_matmul = n_params - summary["vocab_size"] * summary["hidden_size"] * (0 if args.real else 1)
        python = sys.executable
        data_file = project / "data" / "processed" / "train.jsonl"
        ours_args = [python, "scripts/train.py", "--json", "--name", "bench",
                     *project_args(args.steps, args.batch, LEARNING_RATE, args.precision)]
        theirs_args = [python, "-c", TRAINER_SCRIPT, str(model), str(data_file), str(Path(tmp) / "hf"),
                       str(args.steps), str(args.batch), str(LEARNING_RATE), "42", args.precision]
        packed_args = [*ours_args, "--set", "training.packing=true"]
        trl_args = [python, "-c", TRL_SCRIPT, str(model), str(data_file), str(Path(tmp) / "trl"),
                    str(args.steps), str(args.batch), str(LEARNING_RATE), "42", args.precision]
        sides = {"project transformers": ours_args, "project, packing": packed_args,
                 "HF Trainer + peft": theirs_args, "TRL SFTTrainer, packing": trl_args}
        if args.grouped:
            sides["project, grouped"] = [*ours_args, "--set", f"training.length_grouping={GROUP}"]
        found: dict[str, list[dict]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, argv in sides.items():
                out = run(argv, project)
                check_precision(name, args.precision, out)  # never compare different precisions
                if "stages" in out:
                    out = out["stages"]["stage1"]
                    out = {"tokens_per_second": out["tokens_per_second"], "peak_gb": out["peak_memory_gb"]}
                found[name].append(out)
            print(f"  repeat {repeat + 1}: " + ", ".join(f"{name} {found[name][-1]['tokens_per_second']:.0f}"
                                                      for name in sides))
        peak = matmul_peak(precision=args.precision)

    tps = {name: median(values, "tokens_per_second") for name, values in found.items()}
    print(f"\nmodel: {summary['model']}, {n_params / 1e6:.1f}M parameters ({n_matmul / 1e6:.1f}M in matmuls), "
          f"batch {args.batch}, "
          f"{args.steps} steps x {args.repeats} alternating runs, {args.rows} rows of variable length, "
          f"precision {args.precision} on every side")
    print(f"{'':26}{'tokens/s':>10}{'peak GB':>9}{'MFU':>8}")
    for name, values in found.items():
        print(f"{name:26}{tps[name]:>10.0f}{median(values, 'peak_gb'):>9.2f}{4 * n_matmul * tps[name] / peak:>8.1%}")
    for ours in [name for name in sides if name.startswith("project")]:
        print(f"{ours} / HF Trainer: {tps[ours] / tps['HF Trainer + peft']:.2f}x, "
              f"/ TRL packing: {tps[ours] / tps['TRL SFTTrainer, packing']:.2f}x")
    print(f"measured {args.precision} matmul peak: {peak / 1e9:.1f} GFLOP/s (2048x2048, best of 10)")


if __name__ == "__main__":
    main()
