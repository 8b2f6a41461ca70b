"""examples/glue.py end to end on a tiny RoBERTa built from a config and a generated SST-2-style
task in GLUE's own tsv format: it learns, a resumed run equals an uninterrupted one, and the
deterministic flag gives identical results twice."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "glue.py"
POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "movie", "plot", "actor", "was", "and", "very", "film", "story", "it", "is"]


def load_example():
    spec = importlib.util.spec_from_file_location("glue_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_sst2(folder: Path, seed: int = 0) -> None:
    """Sentences of filler words with two sentiment words of one polarity: the label."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for name, count in (("train.tsv", 256), ("dev.tsv", 64)):
        lines = ["sentence\tlabel"]
        for _ in range(count):
            label = rng.randrange(2)
            words = rng.choices(FILLER, k=rng.randrange(4, 9))
            for _ in range(2):
                words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
            lines.append(f"{' '.join(words)}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")


def tiny_roberta(folder: Path) -> None:
    """A 2-layer RoBERTa with a word-level tokenizer over the task's words, saved locally."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {w: i for i, w in enumerate(specials + POSITIVE + NEGATIVE + FILLER)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, pad_token_id=1, num_labels=2)
    RobertaForSequenceClassification(config).save_pretrained(folder)


@pytest.fixture(autouse=True)
def restore_global_state():
    """The example sets process-wide state as a script does (deterministic algorithms, the
    environment variables of full determinism): give the next tests the process as it was."""
    import os

    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    environment = dict(os.environ)
    yield
    torch.use_deterministic_algorithms(deterministic)
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    tiny_roberta(root / "model")
    write_sst2(root / "SST-2")
    return root


def run(setup, out: Path, *extra: str) -> dict:
    argv = ["--model_name_or_path", str(setup / "model"), "--task_name", "sst2", "--data_dir", str(setup / "SST-2"),
            "--apply_lora", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-2",
            "--num_train_epochs", "8", "--max_seq_length", "32", "--per_device_train_batch_size", "16",
            "--warmup_ratio", "0.06", "--weight_decay", "0.1", "--seed", "0", "--output_dir", str(out), "--use_cpu",
            *extra]
    return load_example().main(argv)


def test_glue_example_learns_saves_resumes_and_is_deterministic(setup, tmp_path):
    whole = run(setup, tmp_path / "whole", "--use_deterministic_algorithms")
    assert whole["eval_accuracy"] >= 0.85, whole  # chance is 0.5
    config = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == ["query", "value"]
    again = run(setup, tmp_path / "again", "--use_deterministic_algorithms")
    assert again["eval_accuracy"] == whole["eval_accuracy"] and again["eval_loss"] == whole["eval_loss"]
    checkpoints = sorted((tmp_path / "whole").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 8 and not list(checkpoints[0].glob("model.safetensors"))
    resumed = run(setup, tmp_path / "resumed", "--use_deterministic_algorithms",
                  "--resume_from_checkpoint", str(checkpoints[3]))
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "resumed").glob("checkpoint-*"))
    assert steps == [int(p.name.split("-")[1]) for p in checkpoints[4:]]  # it trained the last 4 epochs only
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert resumed["eval_accuracy"] == whole["eval_accuracy"]


def test_glue_metrics_per_task():
    example = load_example()
    from types import SimpleNamespace

    import numpy as np

    logits = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    labels = np.array([0, 1, 0, 0])
    cola = example.metrics_for("cola")(SimpleNamespace(predictions=logits, label_ids=labels))
    assert cola["accuracy"] == 0.75 and cola["matthews_correlation"] == pytest.approx(0.5773502691896258)
    mrpc = example.metrics_for("mrpc")(SimpleNamespace(predictions=logits, label_ids=labels))
    assert mrpc["f1"] == pytest.approx(2 / 3)
    stsb = example.metrics_for("stsb")(SimpleNamespace(predictions=np.array([[1.0], [2.0], [3.0]]),
                                                      label_ids=np.array([1.0, 2.5, 2.9])))
    assert stsb["spearmanr"] == pytest.approx(1.0) and 0.9 < stsb["pearson"] < 1.0


def test_glue_example_under_torchrun_two_processes(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on a CPU): the Trainer runs DDP, rank 0 saves the adapter."""
    import subprocess
    import sys

    import socket

    with socket.socket() as probe:  # a free port on the loopback, not torchrun's fixed default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(EXAMPLE),
               "--model_name_or_path", str(setup / "model"), "--task_name", "sst2", "--data_dir", str(setup / "SST-2"),
               "--apply_lora", "--learning_rate", "1e-2", "--num_train_epochs", "8", "--max_seq_length", "32",
               "--per_device_train_batch_size", "8", "--seed", "0", "--output_dir", str(out), "--use_cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout[result.stdout.rindex("{"):result.stdout.rindex("}") + 1])
    assert metrics["eval_accuracy"] >= 0.85, metrics
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoint-16").glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_glue_file_formats_are_read_with_the_glue_dataset_columns(tmp_path):
    example = load_example()
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (mnli / name).write_text(f"{header}\n0\t1\t2\tfiction\t(a)\t(b)\t(a)\t(b)\tA man sleeps.\tA man rests.\t"
                                 "entailment\tentailment\n")
    args = example.parse_args(["--model_name_or_path", "m", "--task_name", "mnli", "--data_dir", str(mnli),
                               "--output_dir", str(tmp_path / "out")])
    train, evaluation = example.split_files(args)
    assert sorted(evaluation) == ["matched", "mismatched"]
    (row,) = example.read_rows(evaluation["mismatched"], "mnli")
    assert (row["premise"], row["hypothesis"], row["label"]) == ("A man sleeps.", "A man rests.", "entailment")
    cola = tmp_path / "cola.tsv"  # CoLA's files have no header: source, label, original label, sentence
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n")
    assert example.read_rows(cola, "cola") == [{"sentence": "The sailors rode the breeze clear of the rocks.", "label": "1"}]
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tHe said.\tHe stated.\n")
    (row,) = example.read_rows(mrpc, "mrpc")
    assert (row["sentence1"], row["sentence2"], row["label"]) == ("He said.", "He stated.", "1")
    jsonl = tmp_path / "stsb.json"
    jsonl.write_text('{"sentence1": "a", "sentence2": "b", "label": 3.2}\n')
    assert example.read_rows(jsonl, "stsb") == [{"sentence1": "a", "sentence2": "b", "label": 3.2}]
    with pytest.raises(SystemExit):
        example.parse_args(["--model_name_or_path", "m", "--task_name", "sst2", "--output_dir", "o"])  # no data
