"""tdkd inside the Hugging Face Trainer: an over-parameterized (MPO) BERT student distilled from a
BERT teacher with logit KD + the OPDF tensor constraint, then merged back and saved with
``save_pretrained``; the saved student loads with plain transformers.

    python examples/hf_trainer.py --out /tmp/hf-student [--steps 8]

Offline and tiny (random 4-layer teacher, 2-layer student, one batch of 16 random sentences over
a 64-token vocabulary) so it runs in seconds on a CPU; swap in your own models and dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tdkd_cli
from tdkd_cli import DistillLoss, MPOConfig, TensorConstraint, merge, overparameterize, param_groups


def tiny_bert(layers: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


def dataset(n: int = 16, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (n, length), generator=g)
    labels = (ids[:, :3].sum(1) % 2).long()
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def distill_trainer(teacher, distill: DistillLoss, constraint: TensorConstraint, tensor_lambda: float):
    """A Trainer whose compute_loss is KD (+ CE) from the frozen teacher plus lambda * L_aux."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                t_logits = teacher(**inputs).logits
            loss = distill(outputs.logits, t_logits, {**inputs, "labels": labels}) + tensor_lambda * constraint()
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    teacher = tiny_bert(4, seed=0).eval()
    student = tiny_bert(2, seed=1)
    overparameterize(student, MPOConfig(n=3), teacher=teacher)  # every Linear of the encoder -> 3 cores
    distill = DistillLoss(student, teacher, kd=1.0, temperature=2.0, ce=0.5)
    constraint = TensorConstraint(student, teacher)
    optimizer = torch.optim.AdamW(param_groups(student, lr=5e-3, mpo_lr=5e-3, weight_decay=0.01))
    training_args = TrainingArguments(output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=16,
                                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                      lr_scheduler_type="constant", disable_tqdm=True)
    trainer = distill_trainer(teacher, distill, constraint, tensor_lambda=1.0)(
        model=student, args=training_args, train_dataset=dataset(), optimizers=(optimizer, None))
    trainer.train()
    losses = [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]

    student.eval()
    probe = {"input_ids": torch.randint(5, 64, (4, 12), generator=torch.Generator().manual_seed(7))}
    with torch.no_grad():
        mpo_logits = student(**probe).logits
    merge(student)  # contract the cores back (float64, verified on a probe batch)
    student.save_pretrained(args.out / "student")
    reloaded = AutoModelForSequenceClassification.from_pretrained(args.out / "student").eval()
    with torch.no_grad():
        diff = float((reloaded(**probe).logits - mpo_logits).abs().max())
    result = {"losses": losses, "max_abs_diff": diff, "tdkd": tdkd_cli.__version__,
              "params_merged": sum(p.numel() for p in reloaded.parameters())}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
