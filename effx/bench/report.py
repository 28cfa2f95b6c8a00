"""An effx-bench result as a reader sees it: Markdown tables (:func:`format_table`, the cascade seed's
per-prompt :func:`format_path_table`), Pareto plots (:func:`plot_pareto`), and the files of a run
(:func:`write_outputs`)."""

from __future__ import annotations

import json
import os
import re
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import mean_paths
from .schema import validate_result


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _perplexity_cell(metrics: dict, ratios: dict) -> str:
    if metrics["perplexity"] is None:
        return f"inf ({metrics['zero_prob_share']:.1%} of tokens get p=0)"
    return f"{metrics['perplexity']:.2f} ({ratios['perplexity']:.2f}x)"


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per configuration, dense first."""
    s = result["settings"]
    lines = [
        f"{result['model']['name']}: {s['prompts']} prompts x {s['new_tokens']} new tokens, {s['repeats']} "
        f"repeat(s), batch 1, greedy, interleaved; agreement and perplexity on {s['heldout_tokens']} "
        "held-out "
        f"tokens; {result['machine']['cpu_count']} CPUs, {s['seconds']:.0f} s"
        + (f"; {result['machine']['kernels']}" if result["machine"].get("kernels") else ""),
        "",
        "| config | tok/s | speed-up | TTFT ms | TTFT x | MFLOPs/token | weights MB | peak RSS MB (+in call) "
        "| agreement "
        "| ROUGE-L (dense) | ROUGE-L (ref) | BLEU (dense) | BLEU (ref) | perplexity (x dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        m, r = c["metrics"], c["ratios"]
        lines.append(
            f"| {c['name']} | {m['decode_tok_s']['median']:.2f} | {r['speedup']:.2f}x | "
            f"{m['ttft_ms']['median']:.0f} | {r['ttft_speedup']:.2f}x | {m['decode_mflops']:.1f} | "
            f"{m['weights_mb']:.1f} | {m['peak_rss_mb']:.0f} (+{m['peak_rss_delta_mb']:.0f}) | "
            f"{m['agreement']:.3f} | {m['rouge_l_dense']:.3f} | "
            f"{_fmt(m['rouge_l_reference'], '.3f')} | {m['bleu_dense']:.3f} | "
            f"{_fmt(m['bleu_reference'], '.3f')} | {_perplexity_cell(m, r)} |"
        )
    return "\n".join(lines) + "\n"


def _paired(config: dict[str, Any], base: dict[str, Any], key: str, *, lower: bool = False) -> float:
    """The median over prompts and repeats of ``config``'s ``key`` over ``base``'s in the same sample (of
    ``base``'s over ``config``'s where ``lower`` is better, as times are)."""
    by = {(s["prompt"], s["repeat"]): s[key] for s in base["samples"]}
    ratios = (s[key] / by[(s["prompt"], s["repeat"])] for s in config["samples"])
    return statistics.median(1 / r if lower else r for r in ratios)


def stacked_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configuration ``"<pass> + <base>"`` of ``result`` whose ``<pass>`` and ``<base>`` rows are in it
    too (``effx bench --quantize``): the pass's speed-ups over dense, and over ``<base>`` alone when stacked
    on it, with the share of the first that the second keeps. Decode speed-up and TTFT speed-up are both
    medians of paired per-sample ratios (TTFT is where token drop pays)."""
    by_name = {c["name"]: c for c in result["configs"]}
    rows = []
    for c in result["configs"]:
        name, sep, base = c["name"].rpartition(" + ")
        if not sep or name not in by_name or base not in by_name:
            continue
        alone, on_base = by_name[name]["ratios"], by_name[base]
        decode = _paired(c, on_base, "decode_tok_s")
        ttft = _paired(c, on_base, "ttft_ms", lower=True)
        rows.append(
            {
                "pass": name,
                "base": base,
                "speedup": alone["speedup"],
                "speedup_on_base": decode,
                "kept": decode / alone["speedup"],
                "ttft_speedup": alone["ttft_speedup"],
                "ttft_speedup_on_base": ttft,
                "ttft_kept": ttft / alone["ttft_speedup"],
            }
        )
    return rows


def format_stacked_table(result: dict[str, Any]) -> str:
    """:func:`stacked_rows` as Markdown, or ``""`` when the run has no stacked configurations."""
    rows = stacked_rows(result)
    if not rows:
        return ""
    lines = [
        "Each pass on top of a base configuration (speed-ups over dense alone, over the base when stacked on "
        "it; kept = the second over the first):",
        "",
        "| pass | base | speed-up | on base | kept | TTFT x | on base | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pass']} | {r['base']} | {r['speedup']:.2f}x | {r['speedup_on_base']:.2f}x | "
            f"{r['kept']:.0%} | {r['ttft_speedup']:.2f}x | {r['ttft_speedup_on_base']:.2f}x | "
            f"{r['ttft_kept']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def format_path_table(result: dict[str, Any]) -> str:
    """The cascade seed's table as Markdown: per prompt and over all prompts, each configuration's generation
    time (median over repeats) and its ratio to dense, ROUGE-L against the references (where the data has
    them) and against dense, and the share of tokens each path produced (see ``metrics.paths``)."""
    configs = result["configs"]
    prompts = result["settings"]["prompts"]

    def seconds(c, p=None) -> float:
        per_prompt = [
            statistics.median(s["seconds"] for s in c["samples"] if s["prompt"] == k) for k in range(prompts)
        ]
        return per_prompt[p] if p is not None else sum(per_prompt)

    def shares(paths: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in paths.items())

    lines = [
        "| prompt | config | time s | x dense | ROUGE-L (ref) | ROUGE-L (dense) | share of tokens per path |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in range(prompts):
        for c in configs:
            q = c["per_prompt"][p]
            paths = mean_paths([s["paths"] for s in c["samples"] if s["prompt"] == p])
            lines.append(
                f"| {p + 1} | {c['name']} | {seconds(c, p):.2f} | {seconds(configs[0], p) / seconds(c, p):.2f}x "
                f"| {_fmt(q['rouge_l_reference'], '.3f')} | {q['rouge_l_dense']:.3f} | {shares(paths)} |"
            )
    for c in configs:
        m = c["metrics"]
        lines.append(
            f"| all | {c['name']} | {seconds(c):.2f} | {seconds(configs[0]) / seconds(c):.2f}x "
            f"| {_fmt(m['rouge_l_reference'], '.3f')} | {m['rouge_l_dense']:.3f} | {shares(m['paths'])} |"
        )
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both), sorted by
    the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _family(config: dict[str, Any]) -> str:
    """What a configuration combines, for the plot's colours: its pass names joined by "+", or "dense"."""
    names = list(dict.fromkeys(p.get("name", "?") for p in config["passes"] if isinstance(p, dict)))
    return " + ".join(names) if names else "dense"


def plot_pareto(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG with three panels: decode speed-up against teacher-forced agreement and against ROUGE-L vs
    dense, and time-to-first-token speed-up against agreement (token drop pays at the prefill). Every
    configuration is a point coloured by the passes it combines (one colour per pass and per combination),
    the Pareto front a line through its points (larger, outlined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    families = list(dict.fromkeys(_family(c) for c in configs))
    palette = plt.get_cmap("tab10")
    colour = {
        f: ("tab:red" if f == "dense" else palette((k % 9) + (k % 9 >= 3))) for k, f in enumerate(families)
    }
    fig, axes = plt.subplots(1, 3, figsize=(19, 6), constrained_layout=True)
    panels = (
        (axes[0], "agreement", "teacher-forced agreement with dense", "speedup", "decode speed-up vs dense"),
        (axes[1], "rouge_l_dense", "ROUGE-L against the dense output", "speedup", "decode speed-up vs dense"),
        (
            axes[2],
            "agreement",
            "teacher-forced agreement with dense",
            "ttft_speedup",
            "TTFT speed-up vs dense",
        ),
    )
    for ax, key, xlabel, ratio, ylabel in panels:
        quality = [c["metrics"][key] for c in configs]
        speed = [c["ratios"][ratio] for c in configs]
        front = pareto_front(list(zip(quality, speed, strict=True)))
        on_front = set(front)
        ax.plot([quality[i] for i in front], [speed[i] for i in front], "-", c="0.35", lw=1.2, zorder=2)
        for i, c in enumerate(configs):
            ax.scatter(
                quality[i],
                speed[i],
                s=80 if i in on_front else 35,
                color=colour[_family(c)],
                edgecolors="black" if i in on_front else "none",
                zorder=3,
            )
            right = quality[i] > 0.5 * (min(quality) + max(quality))  # label inward, not off the axes
            ax.annotate(
                textwrap.shorten(c["name"], 70, placeholder="..."),
                (quality[i], speed[i]),
                fontsize=7,
                xytext=(-6 if right else 6, 5),
                textcoords="offset points",
                ha="right" if right else "left",
            )
        ax.axhline(1.0, c="tab:red", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} (median of paired ratios)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colour[f], label=f) for f in families] + [
        plt.Line2D([], [], c="0.35", lw=1.2, label="Pareto front (outlined points)"),
        plt.Line2D([], [], c="tab:red", lw=0.8, ls="--", label="dense speed"),
    ]
    axes[0].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(
        f"effx bench: {result['model']['name']}, {result['settings']['prompts']} prompts x "
        f"{result['settings']['new_tokens']} tokens, {result['settings']['repeats']} repeat(s)"
    )
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(
    result: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True
) -> dict[str, Path]:
    """Write ``bench-<run>.json``, ``bench-<run>.md`` and (``plot``) ``bench-<run>-pareto.png`` into
    ``out_dir`` (created if needed); ``<run>`` is the result's creation time. Returns the paths by kind."""
    validate_result(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[^0-9T]", "", result["created"].split("+")[0])
    base = out / f"bench-{stamp}"
    paths = {"json": base.with_suffix(".json"), "markdown": base.with_suffix(".md")}
    paths["json"].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(
        format_table(result)
        + ("\n" + stacked if (stacked := format_stacked_table(result)) else "")
        + "\nPer prompt (generation time = TTFT + decode):\n\n"
        + format_path_table(result)
    )
    if plot:
        paths["plot"] = plot_pareto(result, f"{base}-pareto.png")
    return paths
