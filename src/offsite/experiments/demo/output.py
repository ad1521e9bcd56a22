"""What a demo run shows: the five-number table as text and as a bar chart."""

from __future__ import annotations

import textwrap
from pathlib import Path
from ...core.plotting import pyplot

ROWS = [("full_zs", "full ZS"), ("emulator_zs", "emulator ZS"), ("emulator_ft", "emulator FT"),
        ("plug_in", "plug-in"), ("full_ft", "full FT")]


def _about(result: dict) -> str:
    if result.get("world", True):
        return f"{result['test_questions']} test questions about people the fine-tuning never saw"
    return (f"{result['test_questions']} {result['task']} {result['test_split']} questions, "
            f"{result['model']} ({result['emulator']['plan']} middle layers kept by the emulator)")


def format_table(result: dict) -> str:
    """The five-number table (four without full FT) plus the privacy gap, as plain text."""
    acc, width = result["accuracy"], 26
    lines = [f"{'setting':<{width}}{'accuracy':>9}", "-" * (width + 9)]
    lines += [f"{label:<{width}}{acc[key] * 100:>8.1f}%" for key, label in ROWS if key in acc]
    lines += ["-" * (width + 9), f"{'Δ (plug-in − emulator FT)':<{width}}{result['delta'] * 100:>+8.1f}",
              f"chance {result['chance'] * 100:.0f}%, {_about(result)}"]
    return "\n".join(lines)


def plot_result(result: dict, path) -> Path | None:
    """A bar per row, the full model's zero-shot as a line and chance dotted; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    acc = result["accuracy"]
    rows = [(key, label) for key, label in ROWS if key in acc]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = {"plug_in": "tab:green", "emulator_zs": "tab:red", "emulator_ft": "tab:red", "full_ft": "tab:blue"}
    bars = ax.bar([label for _, label in rows], [acc[k] * 100 for k, _ in rows],
                  color=[colours.get(k, "tab:gray") for k, _ in rows])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(acc["full_zs"] * 100, color="gray", lw=1)
    ax.axhline(result["chance"] * 100, color="black", lw=1, ls=":", label="chance")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(textwrap.fill(f"offsite-tuning: {_about(result)}", 80), fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
