"""microsoft/LoRA's GLUE recipe with the Hugging Face Trainer and fastlora.

    python examples/glue.py --model_name_or_path roberta-base --task_name mnli --data_dir glue_data/MNLI \
        --apply_lora --lora_r 8 --lora_alpha 16 --learning_rate 5e-4 --num_train_epochs 30 \
        --max_seq_length 512 --per_device_train_batch_size 16 --warmup_ratio 0.06 --weight_decay 0.1 \
        --seed 0 --output_dir out/mnli
    torchrun --nproc_per_node 8 examples/glue.py ...      # the same on 8 GPUs

Any Hugging Face sequence-classification model (a hub id or a local folder). The data are
local files, read without network: ``--data_dir`` holding GLUE's own files (train.tsv and
dev.tsv; MNLI's dev_matched.tsv and dev_mismatched.tsv), or ``--train_file`` /
``--validation_file`` in csv or json (json lines) with the columns of the Hugging Face glue
dataset (sentence / sentence1 + sentence2 / question + sentence / question1 + question2 /
premise + hypothesis, and label). With ``--apply_lora`` the attention's query and value
projections get LoRA adapters and the classifier head trains whole (PEFT's modules_to_save);
the adapter and head are what checkpoints hold (``fastlora.training.AdapterTrainer``).
Evaluates every epoch with the task's GLUE metric (accuracy; F1 for MRPC and QQP; Matthews
correlation for CoLA; Pearson and Spearman for STS-B; MNLI matched and mismatched).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys

import numpy as np
import torch

# task -> (text columns, labels: a list of class names, or None for regression)
TASKS = {
    "cola": (("sentence",), ["0", "1"]),
    "sst2": (("sentence",), ["0", "1"]),
    "mrpc": (("sentence1", "sentence2"), ["0", "1"]),
    "qqp": (("question1", "question2"), ["0", "1"]),
    "stsb": (("sentence1", "sentence2"), None),
    "mnli": (("premise", "hypothesis"), ["contradiction", "entailment", "neutral"]),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"]),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"]),
    "wnli": (("sentence1", "sentence2"), ["0", "1"]),
}
# GLUE's tsv headers name some columns differently from the Hugging Face dataset
TSV_COLUMNS = {
    "mrpc": {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
    "qqp": {"is_duplicate": "label"},
    "stsb": {"score": "label"},
    "mnli": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
}
LORA_TARGETS = (("query", "value"), ("query_proj", "value_proj"), ("q_proj", "v_proj"))  # BERT/RoBERTa, DeBERTa, Llama


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--task_name", required=True, choices=sorted(TASKS))
    parser.add_argument("--data_dir", type=pathlib.Path, help="GLUE's files for the task (train.tsv, dev.tsv)")
    parser.add_argument("--train_file", type=pathlib.Path, help="csv or json lines, the glue dataset's columns")
    parser.add_argument("--validation_file", type=pathlib.Path)
    parser.add_argument("--apply_lora", action="store_true")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--num_train_epochs", type=float, default=30)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--warmup_ratio", type=float, default=0.06)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_deterministic_algorithms", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output_dir", required=True, type=pathlib.Path)
    parser.add_argument("--resume_from_checkpoint", default=None)
    parser.add_argument("--use_cpu", action="store_true", help="train on the CPU even with a GPU present")
    args = parser.parse_args(argv)
    if args.data_dir is None and (args.train_file is None or args.validation_file is None):
        parser.error("give --data_dir (GLUE's files) or both --train_file and --validation_file")
    return args


def read_rows(path: pathlib.Path, task: str) -> list[dict]:
    """Rows of a GLUE tsv (CoLA's has no header), a csv or a json-lines file, with the glue
    dataset's column names."""
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix == ".json" or path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        if task == "cola" and path.suffix == ".tsv":  # source, label, original label, sentence
            return [{"sentence": row[3], "label": row[1]} for row in csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE)]
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        rename = TSV_COLUMNS.get(task, {}) if delimiter == "\t" else {}
        return [{rename.get(k, k): v for k, v in row.items()} for row in reader]


def split_files(args: argparse.Namespace) -> tuple[pathlib.Path, dict[str, pathlib.Path]]:
    """The training file and the evaluation files by name (MNLI: matched and mismatched)."""
    if args.data_dir is None:
        return args.train_file, {"validation": args.validation_file}
    if args.task_name == "mnli":
        return args.data_dir / "train.tsv", {"matched": args.data_dir / "dev_matched.tsv",
                                             "mismatched": args.data_dir / "dev_mismatched.tsv"}
    return args.data_dir / "train.tsv", {"validation": args.data_dir / "dev.tsv"}


def encode(rows: list[dict], task: str, tokenizer, max_length: int) -> list[dict]:
    columns, labels = TASKS[task]
    missing = [c for c in (*columns, "label") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{task}: the data has no column {missing[0]!r} (columns: {sorted(rows[0]) if rows else []})")
    texts = [[row[c] for c in columns] for row in rows]
    encoded = tokenizer(*zip(*texts), truncation=True, max_length=max_length)
    examples = []
    for i, row in enumerate(rows):
        label = float(row["label"]) if labels is None else labels.index(str(row["label"]).strip())
        examples.append({**{k: v[i] for k, v in encoded.items()}, "labels": label})
    return examples


def metrics_for(task: str):
    """compute_metrics for the Trainer: the task's GLUE metrics."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    def compute(prediction) -> dict:
        logits, labels = prediction.predictions, prediction.label_ids
        if TASKS[task][1] is None:
            scores = np.squeeze(logits, -1)
            return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0])}
        predicted = np.argmax(logits, -1)
        out = {"accuracy": float((predicted == labels).mean())}
        if task in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(labels, predicted))
        if task == "cola":
            out["matthews_correlation"] = float(matthews_corrcoef(labels, predicted))
        return out

    return compute


def lora_targets(model: torch.nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in LORA_TARGETS:
        if set(pair) <= names:
            return list(pair)
    raise ValueError(f"found no attention query / value projections to adapt among {sorted(names)[:20]}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.use_deterministic_algorithms:  # before any CUDA work (cuBLAS reads it at init)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    import fastlora
    from fastlora.training import AdapterTrainer

    transformers.set_seed(args.seed)
    train_file, eval_files = split_files(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    labels = TASKS[args.task_name][1]
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=1 if labels is None else len(labels))
    if args.apply_lora:
        fastlora.inject(model, lora_targets(model), r=args.lora_r, lora_alpha=args.lora_alpha)
    train = encode(read_rows(train_file, args.task_name), args.task_name, tokenizer, args.max_seq_length)
    evaluation = {name: encode(read_rows(path, args.task_name), args.task_name, tokenizer, args.max_seq_length)
                  for name, path in eval_files.items()}
    # transformers 5 takes the warm-up ratio as a float warmup_steps; older releases as warmup_ratio
    fields = transformers.TrainingArguments.__dataclass_fields__
    warmup = {"warmup_ratio": args.warmup_ratio} if "warmup_ratio" in fields else {"warmup_steps": args.warmup_ratio}
    training_args = transformers.TrainingArguments(
        output_dir=str(args.output_dir), learning_rate=args.learning_rate, num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size, **warmup,
        weight_decay=args.weight_decay, seed=args.seed, full_determinism=args.use_deterministic_algorithms,
        fp16=args.fp16, bf16=args.bf16, eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        report_to=[], use_cpu=args.use_cpu, disable_tqdm=True,
    )
    trainer_class = AdapterTrainer if args.apply_lora else transformers.Trainer
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train,
        eval_dataset=evaluation if len(evaluation) > 1 else evaluation["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics_for(args.task_name),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results = trainer.evaluate()
    if trainer.is_world_process_zero():
        if args.apply_lora:
            fastlora.save_adapter(model, args.output_dir / "adapter")
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, float)}, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
