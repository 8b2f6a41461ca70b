"""Fine-tune one digit with LoRA: the classic story on scikit-learn's bundled digits (no download).

1. Pretrain a small MLP on the 8x8 digits, with the digit --digit almost absent (5% of its
   training images), so the model is poor at it.
2. Inject LoRA adapters (fastlora.inject) into the MLP's three Linear layers; everything else
   is frozen.
3. Fine-tune only the adapters on the --digit images plus a small replay of the other digits,
   with a progress bar.
4. Print the accuracy per class before and after, the trainable-parameter count, and the size of
   the adapter file (PEFT format, fastlora.save_adapter) next to the full checkpoint; draw both
   confusion matrices to a PNG.

    python examples/finetune_digits.py                 # CPU: well under a minute
    python examples/finetune_digits.py --digit 3 --out-dir /tmp/digits

Uses the GPU when one is present.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fastlora  # noqa: E402


class MLP(nn.Module):
    """64 pixels -> 128 -> 128 -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digit", type=int, default=8, choices=range(10), help="the digit to fine-tune (default 8)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs (default 40)")
    parser.add_argument("--out-dir", type=Path, default=Path("digits-lora"), help="where the adapter and the PNG go")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_data(digit: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Train/test split of the 1797 digits, pixels scaled to [0, 1]; the pretraining set keeps
    only 5% of ``digit``'s training images."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    generator = torch.Generator().manual_seed(seed)
    is_digit = y_train == digit
    rare = is_digit & (torch.rand(len(y_train), generator=generator) < 0.05)
    pretrain = ~is_digit | rare
    replay = ~is_digit & (torch.rand(len(y_train), generator=generator) < 0.3)
    finetune = is_digit | replay
    data = {
        "x_pretrain": x_train[pretrain], "y_pretrain": y_train[pretrain],
        "x_finetune": x_train[finetune], "y_finetune": y_train[finetune],
        "x_test": x_test, "y_test": y_test,
    }
    return {name: t.to(device) for name, t in data.items()}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, description: str) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    model.train()
    progress = tqdm(range(epochs), desc=description, unit="epoch")
    for _ in progress:
        for batch in torch.randperm(len(x), device=x.device).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).argmax(dim=1).cpu()


def per_class_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> list[float]:
    return [(predicted[truth == c] == c).float().mean().item() for c in range(10)]


def plot_confusion(before, after, truth, digit: int, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, predicted, title in ((axes[0], before, "before LoRA"), (axes[1], after, "after LoRA")):
        matrix = confusion_matrix(truth, predicted, labels=range(10))
        ax.imshow(matrix, cmap="Blues")
        for i in range(10):
            for j in range(10):
                if matrix[i, j]:
                    ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] > matrix.max() / 2 else "black")
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} (digit {digit} accuracy {(predicted[truth == digit] == digit).float().mean():.0%})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_data(args.digit, args.seed, device)
    truth = data["y_test"].cpu()

    model = MLP().to(device)
    train(model, data["x_pretrain"], data["y_pretrain"], epochs=60, lr=3e-3, description="pretraining")
    before = predict(model, data["x_test"])

    fastlora.inject(model, ["fc1", "fc2", "fc3"], r=args.rank, lora_alpha=2 * args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train(model, data["x_finetune"], data["y_finetune"], epochs=args.epochs, lr=1e-2, description=f"LoRA on digit {args.digit}")
    after = predict(model, data["x_test"])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    fastlora.save_adapter(model, args.out_dir / "adapter")
    checkpoint = args.out_dir / "full_model.pt"
    torch.save(model.state_dict(), checkpoint)
    adapter_bytes = os.path.getsize(args.out_dir / "adapter" / "adapter_model.safetensors")
    plot_path = args.out_dir / "confusion.png"
    plot_confusion(before, after, truth, args.digit, plot_path)

    print(f"\ndigit {args.digit}, LoRA rank {args.rank}, device {device}")
    print("class      " + " ".join(f"{c:>5}" for c in range(10)))
    for name, predicted in (("before", before), ("after", after)):
        accuracy = per_class_accuracy(predicted, truth)
        print(f"{name:<10} " + " ".join(f"{a:>5.0%}" for a in accuracy)
              + f"   overall {(predicted == truth).float().mean():.1%}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.1%})")
    print(f"adapter file: {adapter_bytes / 1024:.1f} KiB vs full checkpoint {os.path.getsize(checkpoint) / 1024:.1f} KiB")
    print(f"saved the adapter to {args.out_dir / 'adapter'} and the confusion matrices to {plot_path}")


if __name__ == "__main__":
    main()
