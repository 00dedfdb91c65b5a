"""The benchmark's outputs: the printed table, table.json / table.csv / analysis.json / analysis.md, the picture grid
and the speedup-vs-PSNR plot. Every file is written to a temporary name in the same folder and renamed into place,
so an interrupted run never leaves a partial file under a final name."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .._files import check_writable, json_bytes, write_atomic  # noqa: F401 (re-exported)
from .analysis import frontier, setting_line

COLUMNS = [("method", "method", "{}"), ("library", "library", "{}"), ("config", "configuration", "{}"),
           ("nfe", "NFE", "{}"), ("speedup", "speedup", "{:.2f}x"), ("speedup_range", "rounds min-max", "{}"),
           ("ideal_speedup", "ideal S/NFE", "{:.2f}x"), ("achieved_of_ideal", "achieved/ideal", "{:.0%}"),
           ("psnr", "PSNR dB", "{:.2f}"), ("psnr_min", "PSNR min", "{:.2f}"), ("psnr_std", "PSNR sd", "{:.2f}"),
           ("ssim", "SSIM", "{:.4f}"), ("ssim_min", "SSIM min", "{:.4f}"), ("rel_l2", "rel L2 latents", "{:.4f}"),
           ("rel_l2_max", "rel L2 max", "{:.4f}"), ("cache_bytes", "cache bytes", "{:,}")]
CSV_FIELDS = ["key", "method", "library", "config", "nfe", "calls", "steps", "true_cfg_scale", "speedup",
              "speedup_min", "speedup_max", "ideal_speedup", "achieved_of_ideal",
              "psnr", "psnr_min", "psnr_max", "psnr_std", "ssim", "ssim_min", "ssim_max", "ssim_std",
              "rel_l2", "rel_l2_mean", "rel_l2_min", "rel_l2_max", "rel_l2_std", "cache_bytes",
              "time_s", "time_s_min", "time_s_max", "skipped_step_cost", "skipped_step_cost_median",
              "skipped_step_cost_min", "skipped_step_cost_max", "skipped_step_cost_measurable",
              "controller_ms_per_step", "repeatable", "note"]


def speedup_range(row) -> str | None:
    """The speedup's min-max over the timing rounds, e.g. "2.10-2.31x" (None for the uncached row)."""
    lo, hi = row.get("speedup_min"), row.get("speedup_max")
    if lo is None or hi is None:
        return None
    return f"{lo:.2f}-{hi:.2f}x"


def _cell(row, key, fmt):
    v = speedup_range(row) if key == "speedup_range" else row.get(key)
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def format_table(rows) -> str:
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(s.ljust(w) if i < 3 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue().encode()


def _png_bytes_pil(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: dict, rows: list, max_cols: int = 16, scale: int | None = None) -> bytes:
    """Uncached on top, then one row per method (its representative setting): the same prompts and seeds in every
    column, labelled with the method, configuration, NFE and PSNR."""
    from PIL import Image, ImageDraw

    shown = [r for r in rows if r["key"] == "uncached"] + [r for r in rows if r["key"] != "uncached" and r["default"]]
    ref = images["uncached"]
    n, _, h, w = ref.shape
    cols = min(n, max_cols)
    if scale is None:
        scale = max(1, 96 // max(h, w))
    ch, cw = h * scale, w * scale
    label_w, pad = 240, 2
    canvas = Image.new("RGB", (label_w + cols * (cw + pad), len(shown) * (ch + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(shown):
        imgs = images[r["key"]][:cols].clamp(0, 1)
        y = i * (ch + pad)
        for j in range(cols):
            arr = (imgs[j].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cw + pad), y))
        psnr = "ref" if r["psnr"] is None else f"{r['psnr']:.1f} dB"
        text = f"{r['method']} [{r['library']}]\n{r['config']}\nNFE {r['nfe']}  {psnr}  {r['speedup']:.2f}x"
        draw.multiline_text((4, y + 4), text, fill="black", spacing=2)
    return _png_bytes_pil(canvas)


# methods drawn with a marker of their own (beside their library's): the error-controlled rows
METHOD_MARKERS = {("fastcache_rt", "adaptive"): "*"}
_LIBRARY_MARKERS = {"fastcache_rt": "o", "diffusers": "s", "cache-dit": "^"}


def _xy(rs):
    return [(r["psnr"] if r["psnr"] is not None else 100.0, r["speedup"]) for r in rs]


def pareto_series(rows: list) -> list[dict]:
    """The plot's series: one per (library, method), in library then method order, each with its label, marker,
    (PSNR, speedup) points (an identical image at 100 dB) and its frontier."""
    pts = [r for r in rows if r["library"] != "-"]
    order = {"fastcache_rt": 0, "diffusers": 1, "cache-dit": 2}
    methods = sorted({(r["library"], r["method"]) for r in pts}, key=lambda lm: (order.get(lm[0], 3), lm[1]))
    out = []
    for lib, m in methods:
        xy = _xy([r for r in pts if r["library"] == lib and r["method"] == m])
        out.append(dict(library=lib, method=m, label=f"{m} [{lib}]",
                        marker=METHOD_MARKERS.get((lib, m), _LIBRARY_MARKERS.get(lib, "x")), points=xy,
                        frontier=frontier(xy)))
    return out


def pareto_png(rows: list, meta: dict | None = None) -> bytes:
    """Speedup (measured) vs PSNR: every configuration as a point, each method's frontier as a thin line, each
    library's frontier as a thick step line; the title states the setting (steps, guidance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["library"] != "-"]
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors) + \
        list(plt.get_cmap("Set1").colors)
    xy_of = _xy

    fig, ax = plt.subplots(figsize=(11, 7), dpi=110)
    for i, sr in enumerate(pareto_series(rows)):
        lib, xy, star = sr["library"], sr["points"], sr["marker"] == "*"
        color = palette[i % len(palette)]
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], marker=sr["marker"], color=color, s=110 if star else 42,
                   label=sr["label"], zorder=4 if star else 3,
                   edgecolors="black" if lib != "fastcache_rt" or star else "none", linewidths=0.5)
        fr = sr["frontier"]
        if len(fr) > 1:
            ax.plot([p[0] for p in fr], [p[1] for p in fr], color=color, lw=1.6 if star else 1, alpha=0.8)
    all_x = [p[0] for p in xy_of(pts)] or [0.0]
    x_lo = min(all_x) - 1.0
    for lib, style in (("fastcache_rt", "-"), ("diffusers", "--"), ("cache-dit", ":")):
        fr = frontier(xy_of([r for r in pts if r["library"] == lib]))
        if not fr:
            continue
        # staircase: from the left edge at the fastest point's speed, down through each frontier point, to the
        # speed axis' floor under the closest point
        xs, ys = [x_lo], [fr[0][1]]
        for k, (x, y) in enumerate(fr):
            if k:
                xs.append(fr[k - 1][0])
                ys.append(y)
            xs.append(x)
            ys.append(y)
        xs.append(fr[-1][0])
        ys.append(0.0)
        ax.plot(xs, ys, color="black", lw=2.0, ls=style, alpha=0.55, label=f"{lib} frontier")
    ax.set_xlim(left=x_lo)
    ax.set_ylim(bottom=0.0)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("PSNR vs uncached (dB, higher = closer)")
    ax.set_ylabel("wall-clock speedup vs uncached (same run)")
    title = "Speed vs quality: each library's and each method's Pareto frontier"
    if meta:
        title += f"\n{setting_line(meta)}; mean PSNR over {meta.get('batch', '?')} images"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def tolerance_rows(rows: list) -> list[dict]:
    """The error-controlled rows of the table that set a tolerance, by tolerance."""
    found = [r for r in rows if r.get("library") == "fastcache_rt" and r.get("method") == "adaptive"
             and isinstance((r.get("settings") or {}).get("tol"), (int, float)) and r.get("psnr") is not None]
    return sorted(found, key=lambda r: r["settings"]["tol"])


def tolerance_png(rows: list, meta: dict | None = None) -> bytes | None:
    """How ``tol`` relates to quality and speed: the mean PSNR over the images with its min-max range (left axis)
    and the computed steps (right axis), per tolerance; None when the table has no such rows."""
    found = tolerance_rows(rows)
    if not found:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a setting that cached nothing (identical images, 100 dB) is left off the PSNR line: it would squash the axis
    cached = [r for r in found if r["psnr"] < 100.0]
    mean = [r["psnr"] for r in cached]
    lo = [m - r.get("psnr_min", m) for m, r in zip(mean, cached)]
    hi = [r.get("psnr_max", m) - m for m, r in zip(mean, cached)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.errorbar([r["settings"]["tol"] for r in cached], mean, yerr=[lo, hi], fmt="o-", color="tab:blue", capsize=4,
                label="PSNR: mean, min-max")
    tol = [r["settings"]["tol"] for r in found]
    ax.set_xscale("log")
    ax.set_xlabel("tol (relative error of a forecast)")
    ax.set_ylabel("PSNR vs uncached (dB)", color="tab:blue")
    ax.grid(alpha=0.3, which="both")
    ax2 = ax.twinx()
    ax2.plot(tol, [r["nfe"] for r in found], "s--", color="tab:red", label="computed steps")
    ax2.set_ylabel(f"computed steps of {found[0]['steps']}", color="tab:red")
    ax2.set_ylim(bottom=0)
    title = "Error-controlled caching (adaptive): tolerance vs quality and computed steps"
    if meta:
        title += f"\n{setting_line(meta)}; {meta.get('batch', '?')} images"
    ax.set_title(title, fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out: Path, rows, analysis: dict, analysis_md: str, meta: dict, images: dict,
                  grid_path: Path | None = None, pareto_path: Path | None = None,
                  tolerance_path: Path | None = None) -> list[Path]:
    """Render everything first, then write each file atomically; returns the paths written (the tolerance plot
    only when the table has error-controlled rows)."""
    out = Path(out)
    grid_path = Path(grid_path) if grid_path else out / "grid.png"
    pareto_path = Path(pareto_path) if pareto_path else out / "pareto.png"
    tolerance_path = Path(tolerance_path) if tolerance_path else out / "tolerance.png"
    tol_png = tolerance_png(rows, meta)
    files = {
        out / "table.json": json_bytes(dict(meta=meta, rows=rows)),
        out / "table.csv": csv_bytes(rows),
        out / "analysis.json": json_bytes(analysis),
        out / "analysis.md": analysis_md.encode(),
        grid_path: grid_png(images, rows),
        pareto_path: pareto_png(rows, meta),
    }
    if tol_png is not None:
        files[tolerance_path] = tol_png
    for p in files:
        p.parent.mkdir(parents=True, exist_ok=True)
    for p, data in files.items():
        write_atomic(p, data)
    return list(files)
