"""The seed notebook's training recipe as one fresh process: the baseline of the sweep benchmark.

HF Trainer + PEFT exactly as the notebook sets them up (MAX_LENGTH 384 cut after concatenation,
DataCollatorForSeq2Seq padding, gradient checkpointing, bs 4 x GA 4, lr 1e-4, r=8 alpha 32
dropout 0.1 on the 7 projections), on the first `--limit` records, with SwanLab left out.
Prints one JSON line with the time spent importing, loading and training.

    python bench/seed_recipe.py --model DIR --data records.json --limit 50 --epochs 4
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402


def process_func(tokenizer, example: dict) -> dict:
    """The notebook's function, as it is (its tokenizer was a global there)."""
    max_length = 384
    instruction = tokenizer(
        f"<|im_start|>system\n{example['instruction']}<|im_end|>\n<|im_start|>user\n"
        f"{example['input']}<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    response = tokenizer(f"{example['output']}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    return {"input_ids": input_ids[:max_length], "attention_mask": attention_mask[:max_length],
            "labels": labels[:max_length]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--out", default="/tmp/seed_recipe_out")
    args = p.parse_args()

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    t_imported = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map="auto", dtype=torch.bfloat16)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t_loaded = time.time()
    model.enable_input_require_grads()
    model.config.use_cache = False

    with open(args.data, encoding="utf-8") as fh:
        records = json.load(fh)[: args.limit]

    dataset = [process_func(tokenizer, r) for r in records]
    tokens = sum(len(d["input_ids"]) for d in dataset) * args.epochs
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=4, gradient_accumulation_steps=4,
        logging_steps=1, num_train_epochs=args.epochs, save_strategy="no", learning_rate=1e-4,
        gradient_checkpointing=True, report_to="none", bf16=torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True))
    t_train = time.time()
    out = trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t_end = time.time()
    print(json.dumps({
        "limit": args.limit, "records": len(records), "epochs": args.epochs,
        "import_s": round(t_imported - T_START, 2), "load_s": round(t_loaded - t_imported, 2),
        "prepare_s": round(t_train - t_loaded, 2), "train_s": round(t_end - t_train, 2),
        "total_s": round(t_end - T_START, 2), "steps": out.global_step,
        "train_loss": out.training_loss, "tokens": tokens,
        "tokens_per_s": round(tokens / (t_end - t_train), 1),
    }))


if __name__ == "__main__":
    main()
