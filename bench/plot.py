"""Plot a bench/results JSON: fwd+bwd time and peak memory per method per shape.

    python bench/plot.py bench/results/nvidia-h100-80gb-hbm3-2026-05-10.json
    python bench/plot.py bench/results/policy-nvidia-h100-80gb-hbm3-2026-05-10.json
    python bench/plot.py bench/results/preference-nvidia-h100-80gb-hbm3-2026-05-10.json

Works for the output of bench_logprobs.py, bench_policy.py and bench_preference.py.
Writes the PNG next to the JSON (same name, .png). Two panels (time, memory) per head
(frozen / trainable lm_head); methods that were skipped or ran out of memory show a label
instead of a bar; a black dash marks the time of the plain cuBLAS matmuls of each case
(the floor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "fastrl": "#d62728",
    "eager": "#7f7f7f",
    "compile": "#bcbd22",
    "trl_chunked": "#1f77b4",
    "trl_selective": "#17becf",
    "liger": "#2ca02c",
    "cce": "#9467bd",
}


# fastrl's design variants (methods "fastrl:<name>", bench/common.py's --variant): warm
# colours next to fastrl's red, in the order they ran
VARIANT_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#ff9896", "#c49c94", "#f7b6d2", "#dbdb8d")


def _color(name: str, methods: list[str]) -> str | None:
    if name in COLORS:
        return COLORS[name]
    variants = [m for m in methods if m.startswith("fastrl:")]
    if name in variants:
        return VARIANT_COLORS[variants.index(name) % len(VARIANT_COLORS)]
    return None  # matplotlib's next colour


def _matmul_ms(case: dict, mode: str) -> float | None:
    mm = case.get("matmul") or {}
    return mm.get("ms", {}).get(mode) if mm.get("status") == "ok" else None


def _mode(case: dict) -> str:
    modes = case.get("modes", [])
    for m in ("fwdbwd", "fwd", "infer", "bwd"):
        if m in modes:
            return m
    return "fwdbwd"


def _tick_label(case: dict) -> str:
    """The case label on up to three lines: model (or d, V), size, loss config if named."""
    label = case["label"].replace(" N=", "\nN=")
    loss = case.get("loss_label")
    if loss and label.endswith(" " + loss):
        label = label[: -len(loss) - 1] + "\n" + loss
    return label


def _panel(ax, cases, methods, value, ylabel, title, floor=None):
    n = len(methods)
    width = 0.8 / max(n, 1)
    xs = range(len(cases))

    def cell(case, name):
        m = case["methods"].get(name) or {"status": "n/a"}
        return m, (value(case, m) if m.get("status") == "ok" else None)

    table = {name: [cell(c, name) for c in cases] for name in methods}
    any_value = any(v is not None for col in table.values() for _, v in col)
    for j, name in enumerate(methods):
        offs = [x - 0.4 + width * (j + 0.5) for x in xs]
        vals = [v or 0.0 for _, v in table[name]]
        ax.bar(offs, vals, width, label=name, color=_color(name, methods))
        if not any_value:
            continue
        for x, (m, v) in zip(offs, table[name], strict=True):
            if v is not None:
                continue
            ax.annotate(
                m["status"] if m["status"] != "ok" else "n/a",
                (x, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 3),
                textcoords="offset points",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=6,
                color="0.4",
            )
    if floor is not None and any_value:
        marked = False
        for x, c in zip(xs, cases, strict=True):
            f = floor(c)
            if f:
                kw = {} if marked else {"label": "cuBLAS matmuls"}
                ax.hlines(f, x - 0.42, x + 0.42, colors="k", linestyles="--", lw=1, **kw)
                marked = True
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_tick_label(c) for c in cases], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if any_value:
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not measured here", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_yticks([])


def plot(json_path, out_path=None) -> Path:
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    cases = data["cases"]
    if not cases:
        raise ValueError(f"{json_path} has no cases")
    methods: list[str] = []
    for c in cases:
        methods += [m for m in c["methods"] if m not in methods]
    heads = [h for h in ("frozen", "trainable") if any(c["head"] == h for c in cases)]

    n_cases = max(sum(c["head"] == h for c in cases) for h in heads)
    width = min(20.0, max(8.0, 0.17 * n_cases * (len(methods) + 1)))
    fig, axes = plt.subplots(2 * len(heads), 1, figsize=(width, 3.3 * 2 * len(heads)))
    axes = list(axes) if len(heads) * 2 > 1 else [axes]
    for i, head in enumerate(heads):
        sub = [c for c in cases if c["head"] == head]
        mode = _mode(sub[0])
        _panel(
            axes[2 * i],
            sub,
            methods,
            lambda c, m, mode=mode: m.get("ms", {}).get(mode),
            "time (ms)",
            f"{mode} time, {head} lm_head ({sub[0]['dtype']}) - lower is better",
            floor=lambda c, mode=mode: _matmul_ms(c, mode),
        )
        _panel(
            axes[2 * i + 1],
            sub,
            methods,
            lambda c, m, mode=mode: m.get("peak_mem_mib", {}).get(mode),
            "peak memory above inputs (MiB)",
            f"{mode} peak memory, {head} lm_head - lower is better",
        )
    env = data.get("env", {})
    commit = (env.get("commit") or "?")[:10] + ("+dirty" if env.get("dirty") else "")
    title = data.get("title") or f"fastrl.{data.get('benchmark', 'linear_logprobs')}"
    fig.suptitle(
        f"{title} on {env.get('device', '?')} ({env.get('date', '')})\n"
        f"torch {env.get('torch', '?')} | triton {env.get('triton', '?')} | commit {commit}",
        fontsize=10,
        y=0.995,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = max(1, min(len(handles), int(width / 1.6)))
    rows = -(-len(handles) // ncol)
    top = 1 - (0.5 + 0.25 * rows) / fig.get_figheight()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, top + 0.2 / fig.get_figheight()),
        ncol=ncol,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, top - 0.05 / fig.get_figheight()))
    out_path = Path(out_path) if out_path else json_path.with_suffix(".png")
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    for path in argv:
        print(f"wrote {plot(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
