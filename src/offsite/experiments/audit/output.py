"""What ``offsite audit`` shows: a Markdown table per task and a bar chart of every attack against the plug-in.

The number to read is the privacy margin (plug-in minus the best attack; positive = the emulator
stays behind even for the strongest attack tried), so both outputs lead with the plug-in and the
full model, put each attack beside them with its gaps, and end with the margin and which attack
set it. Accuracies are shown in percent, perplexities as they are (lower is better, and every
gap is signed so that positive means the reference is better). Matplotlib is optional, as for
``offsite report``: without it there is no PNG.
"""

from __future__ import annotations

from pathlib import Path

from ...core.plotting import pyplot
from ..protocol import slug

REFERENCE_ROWS = (("full_zs", "Full ZS"), ("full_ft", "Full FT"), ("plug_in", "Plug-in (honest adapter)"),
                  ("emu_zs", "Emu ZS"))


def format_audit(audit: dict) -> str:
    """Markdown: per task the reference rows, one row per attack with its gaps, then the margin."""
    out = [f"Budget `{audit['budget']}`: {audit['steps_per_attack']} optimizer steps per attack "
           f"(lr {audit['finetune']['lr']:g}, batch {audit['finetune']['batch_size']}).\n"]
    for task, res in audit["results"].items():
        acc = res["higher_is_better"]
        unit = "accuracy %" if acc else "perplexity, lower is better"
        out.append(f"### {slug(task)} ({unit})\n")
        out.append("| | score | vs plug-in | vs full | steps | trainable params |")
        out.append("|---|---|---|---|---|---|")
        for row, label in REFERENCE_ROWS:
            if res["scores"].get(row) is not None:
                out.append(f"| {label} | {_fmt(res['scores'][row], acc)} | | | | |")
        for name, att in res["attacks"].items():
            best = " **(best)**" if name == res["best_attack"] else ""
            out.append(f"| {att['what']}{best} | {_fmt(att['score'], acc)} | {_gap(att['gap_to_plug_in'], acc)} | "
                       f"{_gap(att['gap_to_full'], acc)} | {att['steps']} | {att['trainable_parameters']:,} |")
        out.append(f"\n**Privacy margin** (plug-in − best attack, {res['best_attack']}): "
                   f"{_gap(res['margin'], acc)}{' points' if acc else ''}\n")
    return "\n".join(out)


def _fmt(value, acc: bool) -> str:
    return "–" if value is None else f"{100 * value:.1f}" if acc else f"{value:.2f}"


def _gap(value, acc: bool) -> str:
    return "–" if value is None else f"{100 * value:+.1f}" if acc else f"{value:+.2f}"


def plot_audit(audit: dict, path) -> Path | None:
    """Bars per task: the reference rows, then every attack, with the plug-in as a dashed line (PNG).

    Returns:
        The PNG's path, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    tasks = list(audit["results"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        res = audit["results"][task]
        scale = 100 if res["higher_is_better"] else 1
        labels, values, colours = [], [], []
        for row, label in REFERENCE_ROWS:
            if res["scores"].get(row) is not None:
                labels.append(label.split(" (")[0])
                values.append(scale * res["scores"][row])
                colours.append("0.55")
        for name, att in res["attacks"].items():
            labels.append(name)
            values.append(scale * att["score"])
            colours.append("tab:red" if name == res["best_attack"] else "tab:orange")
        ax.bar(range(len(values)), values, color=colours)
        ax.axhline(scale * res["scores"]["plug_in"], color="k", linestyle="dashed", linewidth=1, label="plug-in")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)" if res["higher_is_better"] else "perplexity (lower is better)")
        ax.set_title(f"{slug(task)}: margin {_gap(res['margin'], res['higher_is_better'])}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Attacks on {Path(audit['emulator']).name} ({audit['budget']} budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
