"""The tuner's outputs: the Pareto-front picture and the Markdown table."""

from __future__ import annotations

from .search import METRICS


def front_png(result: dict) -> bytes:
    """Every setting the search ran (computed steps vs closeness), the Pareto front, each target and the policy
    chosen for it (its held-out quality)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    cached = [p for p in result["points"] if p["nfe"] < result["steps"]]  # settings that computed every step: off
    arms_ = sorted({p["arm"] for p in cached})
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("Dark2").colors)
    for i, a in enumerate(arms_):
        pts = [p for p in cached if p["arm"] == a]
        ax.scatter([p["nfe"] for p in pts], [_capped(p[metric]) for p in pts], s=18, alpha=0.7,
                   color=palette[i % len(palette)], label=a)
    fr = [p for p in result["front"] if p["nfe"] < result["steps"]]
    ax.step([p["nfe"] for p in fr], [_capped(p[metric]) for p in fr], where="post", color="black", lw=1.5,
            label="Pareto front (search set)")
    for e in result["targets"]:
        ax.axhline(e["target"], color="grey", lw=0.8, ls=":")
        if e.get("met"):
            ax.scatter([e["heldout_nfe"]], [_capped(e["heldout_quality"][metric])], marker="*", s=220,
                       color="#cc3311", edgecolors="black", zorder=5)
            ax.annotate(f"{e['arm']} ({e['heldout_nfe']} steps)", (e["heldout_nfe"], e["heldout_quality"][metric]),
                        textcoords="offset points", xytext=(6, -12), fontsize=7)
    ax.scatter([], [], marker="*", s=120, color="#cc3311", edgecolors="black", label="chosen (held-out)")
    ax.set_xlabel(f"computed steps of {result['steps']} (NFE)")
    ax.set_ylabel(f"{metric} vs uncached ({METRICS[metric]})")
    if metric == "rel_l2":
        ax.set_yscale("log")
        ax.invert_yaxis()
    ax.set_title(f"fastcache-rt tune: {result['search']['generations']} search generations of "
                 f"{result['search']['settings_in_grid']} settings; {setting_text(result)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _capped(v: float) -> float:
    return min(v, 100.0)


def setting_text(result: dict) -> str:
    """The setting the tuner ran at: steps and true CFG."""
    st = result.get("setting") or {"steps": result.get("steps")}
    if st.get("true_cfg_scale"):
        neg = st.get("negative_prompt")
        neg = neg[0] if isinstance(neg, list) and neg else neg
        return (f"{st['steps']} steps, true CFG {st['true_cfg_scale']:g} (negative prompt {neg or ''!r}; NFE: the "
                f"mean over the cond and uncond branches)")
    return f"{st['steps']} steps, no true CFG"


def markdown(result: dict) -> str:
    m = result["metric"]
    lines = [f"Setting: {setting_text(result)}.", "",f"| target | chosen policy | setting | NFE | {m} search | {m} held-out | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in result["targets"]:
        if not e.get("met"):
            lines.append(f"| {e['label']} | {e.get('reason', 'not met on held-out data')} | | | | | |")
            continue
        lines.append(f"| {e['label']} | {e['arm']} | {e['knob']} | {e['heldout_nfe']} | "
                     f"{e['search_quality'][m]:.4g} | {e['heldout_quality'][m]:.4g} | {e['speedup']:.2f}x |")
    s = result["search"]
    lines.append("")
    lines.append(f"Search: {s['generations']} generations of {len(s['prompts'])} prompts x {len(s['seeds'])} seeds "
                 f"({s['settings_in_grid']} settings in the grid, {len(s['arms'])} arms); held-out: "
                 f"{result['holdout']['generations']} generations; {result['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"
