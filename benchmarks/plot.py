"""Draw the benchmark plots from a results CSV (and nothing else).

    python -m benchmarks.plot benchmarks/results/cpu-x86_64.csv

Uses the latest run in the file (its newest timestamp) and writes, beside the CSV:
<name>-time.png (time vs tokens M, one row of panels per mode present, one panel per layer
shape), <name>-speedup.png (speedup over PEFT, one panel per mode present) and
<name>-memory.png (bytes saved for backward per layer, dropout 0 and 0.1).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


MODE_LABELS = {"fwd": "forward", "bwd": "backward", "full": "forward+backward"}
NEEDED = ("timestamp", "status", "mode", "provider", "M", "K", "N", "r", "dropout", "median_ms", "vs_peft", "saved_bytes")


def latest_run(path: pathlib.Path) -> list[dict]:
    """The measured rows of the newest run in ``path``; ValueError naming the file otherwise."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"cannot read the results CSV {path}: {error}") from error
    if not rows:
        raise ValueError(f"{path} holds no rows")
    missing = [c for c in NEEDED if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} is not a benchmarks.run CSV (no column {missing[0]!r})")
    newest = max(r["timestamp"] for r in rows)
    measured = [r for r in rows if r["timestamp"] == newest and r["status"] == "ok"]
    if not measured:
        raise ValueError(f"{path}: the newest run ({newest}) has no measured rows")
    return measured


def modes_present(rows: list[dict]) -> list[str]:
    return [m for m in MODE_LABELS if any(r["mode"] == m for r in rows)]


def _title(rows: list[dict]) -> str:
    r = rows[0]
    return f"{r['device']} · {r['dtype']} · torch {r['torch']} · {r['timestamp'][:10]} · {r['git_sha']}"


def plot_time(rows: list[dict], out: pathlib.Path) -> None:
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["K"], r["N"], r["r"], r["dropout"])
        panels[(r["mode"], key)][r["provider"]].append((int(r["M"]), float(r["median_ms"])))
    modes = modes_present(rows)
    keys = sorted({key for _, key in panels}, key=lambda k: tuple(float(v) for v in k))
    fig, axes = plt.subplots(len(modes), len(keys), figsize=(4.5 * len(keys), 4 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        for ax, key in zip(axes[row], keys):
            for provider, points in sorted(panels[(mode, key)].items()):
                points.sort()
                ax.plot([m for m, _ in points], [t for _, t in points], marker="o", label=provider)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens M")
            ax.set_ylabel(f"{MODE_LABELS[mode]} ms (median)")
            ax.set_title(f"K={key[0]} N={key[1]} r={key[2]} p={key[3]}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_speedup(rows: list[dict], out: pathlib.Path) -> None:
    modes = modes_present(rows)
    fig, axes = plt.subplots(len(modes), 1, figsize=(8, 4 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        bars = defaultdict(dict)
        for r in rows:
            if r["mode"] == mode and r["vs_peft"] and r["provider"] not in ("peft", "base"):
                label = f"M={r['M']} K={r['K']} N={r['N']}\nr={r['r']} p={r['dropout']}"
                bars[label][r["provider"]] = 1.0 / float(r["vs_peft"])
        labels = list(bars)
        providers = sorted({p for v in bars.values() for p in v})
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [bars[label].get(provider, 0) for label in labels], width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel(f"{MODE_LABELS[mode]} speedup over PEFT (x)")
        if providers:
            ax.legend(fontsize=8)
    axes[0][0].set_title(_title(rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_memory(rows: list[dict], out: pathlib.Path) -> None:
    biggest = max(rows, key=lambda r: int(r["M"]) * int(r["K"]))
    shape = {k: biggest[k] for k in ("M", "K", "N", "r")}
    mode = modes_present(rows)[-1]  # saved bytes do not depend on the mode: one row per provider
    chosen = [r for r in rows if r["mode"] == mode and all(r[k] == v for k, v in shape.items())]
    providers = sorted({r["provider"] for r in chosen})
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, dropout in enumerate(sorted({r["dropout"] for r in chosen})):
        values = {r["provider"]: float(r["saved_bytes"]) / 2**20 for r in chosen if r["dropout"] == dropout}
        ax.bar([j + 0.4 * i for j in range(len(providers))], [values.get(p, 0) for p in providers], 0.4,
               label=f"dropout {dropout}")
    ax.set_xticks([j + 0.2 for j in range(len(providers))], providers, fontsize=8)
    ax.set_ylabel("MiB saved for backward beyond x")
    ax.set_title(f"M={shape['M']} K={shape['K']} N={shape['N']} r={shape['r']} · " + _title(rows), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_csv(path: pathlib.Path) -> list[pathlib.Path]:
    rows = latest_run(path)
    outputs = []
    for suffix, draw in (("time", plot_time), ("speedup", plot_speedup), ("memory", plot_memory)):
        out = path.with_name(f"{path.stem}-{suffix}.png")
        draw(rows, out)
        outputs.append(out)
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=pathlib.Path)
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"no results CSV at {args.csv}")
    try:
        pngs = plot_csv(args.csv)
    except ValueError as error:
        parser.error(str(error))
    for png in pngs:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
