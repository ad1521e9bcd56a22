"""The frontier as a Markdown table and a PNG (plug-in against the emulator side, one dot per point)."""

from __future__ import annotations

from pathlib import Path

from ...core.plotting import pyplot
from ..protocol import slug


def _fmt(value, higher: bool) -> str:
    return "–" if value is None else f"{100 * value:.1f}" if higher else f"{value:.2f}"


def _label(settings: dict, knob: str) -> str:
    parts = [f"{knob}={settings[knob]}"]
    if "lambda_attn" in settings:
        parts.append(f"λ={settings['lambda_attn']:g}")
    return ", ".join(parts)


def format_frontier(record: dict) -> str:
    """One row per point: settings, size, emulator FT, strongest attack, plug-in, Δ, target met."""
    higher, knob = record["higher_is_better"], record["knob"]
    side = "best attack" if record["audit"] else "emu FT"
    target = record["target"]
    wanted = (f"{side} ≤ {target['max_emulator_score']:g}" if target["max_emulator_score"] is not None
              else f"Δ = plug-in − {side} ≥ {target['min_delta']:g}" if higher
              else f"Δ = {side} − plug-in ≥ {target['min_delta']:g}")
    unit = "accuracy, %" if higher else "word perplexity, lower is better"
    lines = [f"# Frontier of {record['method']} on {slug(record['task'])} ({record['split']} split, {unit})", "",
             f"Full model zero-shot: {_fmt(record['full_zs'], higher)}. Target: {wanted}.", "",
             "| point | settings | emulator / full params | emu FT | best attack | plug-in | Δ | meets |",
             "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(record["points"]):
        params = row["parameters"]
        attack = "–" if row["attack"] is None else f"{_fmt(row['emulator_side'], higher)} ({row['attack']})"
        chosen = " **chosen**" if record.get("chosen") == i else ""
        delta = f"{100 * row['delta']:+.1f}" if higher else f"{row['delta']:+.2f}"
        lines.append(f"| {i}{chosen} | {_label(row['settings'], knob)} | {params['emulator'] / params['full']:.2f} | "
                     f"{_fmt(row['emu_ft'], higher)} | {attack} | {_fmt(row['plug_in'], higher)} | {delta} | "
                     f"{'yes' if row['meets'] else 'no'} |")
    if record.get("chosen") is None:
        lines += ["", "**No point meets the target**: no emulator was written."]
    return "\n".join(lines)


def plot_frontier(record: dict, path) -> Path | None:
    """Plug-in (up = utility) against the emulator side (left = privacy), the chosen point ringed.

    Returns:
        The PNG's path, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    higher, knob = record["higher_is_better"], record["knob"]
    scale = 100 if higher else 1
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    rows = record["points"]
    xs = [scale * r["emu_ft"] for r in rows]
    ys = [scale * r["plug_in"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue", label="emulator FT", zorder=3)
    if record["audit"]:
        ax.scatter([scale * r["emulator_side"] for r in rows], ys, color="tab:red", marker="x",
                   label="strongest attack", zorder=3)
    for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
        if record["audit"]:  # how far the worst case moves each point towards the model
            ax.plot([x, scale * r["emulator_side"]], [y, y], color="0.7", linewidth=0.8, zorder=2)
        # points often coincide: alternate the labels above and below
        ax.annotate(f"{i}: {_label(r['settings'], knob)}", (x, y), fontsize=6, xytext=(3, 4 if i % 2 else -9),
                    textcoords="offset points")
    if record.get("chosen") is not None:
        best = rows[record["chosen"]]
        ax.scatter([scale * best["emulator_side"]], [scale * best["plug_in"]], s=180, facecolors="none",
                   edgecolors="k", label="chosen", zorder=4)
    ax.axhline(scale * record["full_zs"], color="0.5", linestyle="dashed", linewidth=1, label="full ZS")
    what = "accuracy (%)" if higher else "perplexity"
    ax.set_xlabel(f"emulator side, {what} ({'left' if higher else 'right'} = more private)")
    ax.set_ylabel(f"plug-in, {what}")
    ax.set_title(f"{record['method']} frontier on {slug(record['task'])}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
