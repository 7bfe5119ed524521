"""The report: how an adapter was made and how good each module's solve is (SPEC §5, "The report").

One schema, versioned, for the API (``lora_da_report.json`` written beside a
PEFT adapter by ``save_pretrained``) and the CLI (``solve``/``init``/``report``),
and one module for all it takes:

* :func:`build_report` is the only place its keys are spelt; :func:`write_report`
  writes it (atomically), :func:`model_card_section` says it in a model card;
* :func:`load_report` reads one back (an adapter folder or a ``.json``) and
  :func:`check_report_shape` checks every field the table and the figure read;
* :func:`format_table` and :func:`figure` show it; :func:`poor_modules` lists the
  modules with a poor init, in this version's report or an older one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_da.errors import CLIError
from lora_da.files import write_atomic, write_text_atomic
from lora_da.version import __version__
from lora_da.words import count

REPORT_NAME = "lora_da_report.json"
REPORT_FORMAT = "lora-da-report"
# 2: one schema for the API and the CLI: "version", "rank", "omega_norm",
# "damping", "warnings" per module, "poor_init" at the top. Version-1 reports (no
# "version") are still read by `lora-da report`.
REPORT_VERSION = 2


def _float(v):
    return None if v is None else float(v)


def module_report(init, info=None) -> dict:
    """One module's entry: ``init`` is a :class:`lora_da.init.ModuleInit` or a bare solve
    result (then ``seconds`` is None); ``info`` its :class:`ModuleInfo` when the statistics
    are at hand (``kind``, ``input_group``)."""
    from lora_da.quality import assess_result

    result = getattr(init, "result", init)
    notes = result.notes if not isinstance(result.notes, str) else ([result.notes] if result.notes else [])
    seconds = getattr(init, "seconds", None)
    return {
        "n": int(result.A.shape[1]),
        "m": int(result.B.shape[0]),
        "rank": int(result.A.shape[0]),
        "kind": None if info is None else info.kind,
        "input_group": None if info is None else info.input_group,
        "eigenvalues": [float(v) for v in result.eigenvalues],
        "next_eigenvalue": _float(result.next_eigenvalue),
        "gap": _float(result.gap),
        "omega_norm": _float(getattr(result, "omega_norm", None)),
        "residual": float(result.residual),
        "sigma": float(result.sigma),
        "c": float(result.c),
        "damping": _float(getattr(result, "damping", None)),
        "method": str(result.method),
        "iterations": int(result.iterations),
        "seconds": _float(seconds),
        "notes": list(notes),
        "warnings": assess_result(result),
    }


def build_report(results: dict, config, *, stats=None, source: str = "solved from data",
                 adapter_name: str | None = None) -> dict:
    """The report of one initialization: ``results`` maps module names to
    :class:`ModuleInit` (or solve results); ``config`` is the :class:`LoraDAConfig`."""
    modules = {name: module_report(r, None if stats is None else stats.modules.get(name))
               for name, r in results.items()}
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "init": "lora-da",
        "lora_da_version": __version__,
        "source": source,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "n_samples": None if stats is None else stats.n_samples,
        "statistics_config": None if stats is None else stats.config,
        "model": None if stats is None else stats.model,
        "poor_init": sorted(name for name, m in modules.items() if m["warnings"]),
        "modules": modules,
    }


def model_card_section(report: dict) -> str:
    """A section for the README.md (model card) beside the adapter: PEFT's
    ``adapter_config.json`` can only say ``init_lora_weights: true``, which reads as
    PEFT's default init."""
    cfg = report.get("config") or {}
    poor = report.get("poor_init") or []
    lines = [
        "",
        "## Initialization: LoRA-DA",
        "",
        f"`lora_A` and `lora_B` were initialized with LoRA-DA (lora-da {report.get('lora_da_version', '?')}; "
        "arXiv 2510.24561), not with PEFT's default init: `init_lora_weights: true` in `adapter_config.json` "
        "is PEFT's own flag, kept because PEFT validates it.",
        "",
        f"- settings: r = {cfg.get('rank')}, n_pop = {cfg.get('n_pop')}, γ = {cfg.get('gamma')}, "
        f"β = {cfg.get('beta')}, α = {cfg.get('alpha')}, preserve_output = {cfg.get('preserve_output')}",
        f"- modules: {len(report.get('modules') or {})}"
        + (f"; calibration samples: {report['n_samples']}" if report.get("n_samples") is not None else ""),
        f"- modules with a poor init (see the report): {len(poor)}"
        + (f" ({', '.join(poor[:5])}{', …' if len(poor) > 5 else ''})" if poor else ""),
        f"- every setting and each module's diagnostics: `{REPORT_NAME}` "
        f"(format `{REPORT_FORMAT}` version {report.get('version')})",
        "",
    ]
    return "\n".join(lines)


# -- files ------------------------------------------------------------------------------------


def write_report(path: str | os.PathLike, report: dict) -> None:
    """The report as indented JSON at ``path``, written whole or not at all."""
    write_text_atomic(path, json.dumps(report, indent=2))


def add_model_card_section(folder: str, report: dict) -> None:
    """Append the LoRA-DA section to ``folder``'s README.md (PEFT's model card; created
    when PEFT wrote none), once: a second save replaces the section, not repeats it."""
    path = os.path.join(folder, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    marker = "\n## Initialization: LoRA-DA\n"
    if marker in text:
        text = text[: text.index(marker)]
    text = text.rstrip("\n") + "\n" + model_card_section(report)
    write_text_atomic(path, text)


def is_report(path: str | os.PathLike) -> bool:
    """``path`` holds a report lora-da wrote (its ``format``), whatever its version."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and report.get("format") == REPORT_FORMAT


def load_report(path: Path) -> dict | None:
    """The report in an adapter folder or a ``.json`` file, checked by
    :func:`check_report_shape`; None when ``path`` is neither (a statistics file)."""
    cand = None
    if path.is_dir():
        cand = path / REPORT_NAME
        if not cand.is_file():
            raise FileNotFoundError(f"{path}: directory without {REPORT_NAME}")
    elif path.suffix == ".json":
        cand = path
    if cand is None:
        return None
    try:
        report = json.loads(cand.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested past the recursion limit
        raise ValueError(f"{cand}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(report, dict) or "modules" not in report:
        raise ValueError(f"{cand}: not a lora-da report")
    check_report_shape(cand, report)
    return report


_REPORT_NUMBERS = ("next_eigenvalue", "gap", "residual", "sigma", "c", "seconds", "omega_norm")


def check_report_shape(path: Path, report: dict) -> None:
    """Every field the table and the plot read has the type they expect, so a report
    edited or produced elsewhere gives one line, not a TypeError from format()."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def bad(what: str, v) -> CLIError:
        return CLIError(f"{path}: not a lora-da report: {what}, got {json.dumps(v)[:60]}")

    if not isinstance(report.get("config", {}), dict):
        raise bad("'config' must be an object", report["config"])
    mods = report["modules"]
    if not isinstance(mods, dict):
        raise bad("'modules' must be an object", mods)
    for name, r in mods.items():
        if not isinstance(r, dict):
            raise bad(f"module {name!r} must be an object", r)
        for key in _REPORT_NUMBERS:
            if r.get(key) is not None and not number(r[key]):
                raise bad(f"module {name!r}: {key!r} must be a number", r[key])
        ev = r.get("eigenvalues")
        if ev is not None and not (isinstance(ev, list) and all(number(v) for v in ev)):
            raise bad(f"module {name!r}: 'eigenvalues' must be a list of numbers", ev)
        for key in ("notes", "warnings"):
            v = r.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise bad(f"module {name!r}: {key!r} must be a list of strings", v)


# -- the table and the figure -------------------------------------------------------------------


def _fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


def format_table(report: dict) -> str:
    """The report as a text table, one row per module, then its notes and poor-init warnings."""
    rows = []
    for name, r in report["modules"].items():
        ev = r.get("eigenvalues") or []
        lam = f"{ev[0]:.3e}..{ev[-1]:.3e}" if ev else "-"
        rows.append(
            [
                name,
                str(r.get("n", "-")),
                str(r.get("m", "-")),
                str(r.get("method", "-")),
                _fmt(r.get("residual")),
                _fmt(r.get("gap")),
                lam,
                _fmt(r.get("sigma")),
                _fmt(r.get("c")),
                _fmt(r.get("seconds"), ".3f"),
            ]
        )
    head = ["module", "n", "m", "method", "residual", "gap", "λ_1..λ_r", "σ", "c", "time[s]"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for name, r in report["modules"].items():
        for note in r.get("notes") or []:
            out.append(f"note: {name}: {note}")
    poor = poor_modules(report)
    for name, msgs in poor.items():
        for msg in msgs:
            out.append(f"warning: poor init: {name}: {msg}")
    if poor:
        out.append(f"lora-da report: {len(poor)} of {count(len(report['modules']), 'module')} "
                   f"{'has' if len(poor) == 1 else 'have'} a poor init (warnings above; SPEC §5, 'A poor init')")
    return "\n".join(out)


def poor_modules(report: dict) -> dict[str, list[str]]:
    """``{module: warnings}`` for the modules whose init is poor: the report's own
    ``warnings`` (version 2), else judged from its eigenvalues (a version-1 report)."""
    from lora_da.quality import assess

    out = {}
    for name, r in report["modules"].items():
        msgs = r.get("warnings")
        if msgs is None:
            msgs = assess(r.get("eigenvalues") or [], r.get("gap"), r.get("omega_norm"))
        if msgs:
            out[name] = list(msgs)
    return out


def pyplot():
    """matplotlib's pyplot on a file backend, or an error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'lora-da[plot]' (or pip install matplotlib)") from None
    return plt


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """``model.layers.12.self_attn.q_proj`` → ``(12, "q_proj")``."""
    numbers = [int(p) for p in name.split(".") if p.isdigit()]
    return (numbers[0] if numbers else None), name.rsplit(".", 1)[-1]


def figure(report: dict):
    """One panel per projection type. In it, for each module (coloured by layer), how
    far each of its bottom eigenvalues lies below the next one past the cut,
    ``(λ_{r+1} − λ_i) / ‖Ω‖₂`` for i = 1..r, on a log scale: the last point is the gap
    at the cut, which a plot of λ_i itself hides when it is 1e-11 of ‖Ω‖. The dashed line
    is the poor-gap threshold (SPEC §5); a module with a poor init gets a red ×, and an
    eigenvalue λ_i ≥ 0 (r past the informative directions) an open marker."""
    import numpy as np

    from lora_da.quality import POOR_GAP_REL

    plt = pyplot()
    poor = poor_modules(report)
    kinds: dict[str, list] = {}
    for name, r in report["modules"].items():
        layer, kind = _layer_and_kind(name)
        kinds.setdefault(kind, []).append((layer, name, r))
    layers = [layer for rows in kinds.values() for layer, _, _ in rows if layer is not None]
    lo, hi = (min(layers), max(layers)) if layers else (0, 1)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(lo, max(hi, lo + 1))
    ncols = min(4, len(kinds)) or 1
    nrows = -(-len(kinds) // ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.2, 3.0 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    floor = 1e-17  # below float64 resolution relative to ‖Ω‖: a gap of exactly 0 is drawn here
    rank = report.get("config", {}).get("rank")
    for ax, (kind, rows) in zip(axes.flat, sorted(kinds.items())):
        poor_x, poor_y = [], []
        for layer, name, r in sorted(rows, key=lambda t: (t[0] is None, t[0] or 0, t[1])):
            ev = np.asarray(r.get("eigenvalues") or [], dtype=float)
            nxt = r.get("next_eigenvalue")
            if not len(ev) or nxt is None:
                continue
            scale = r.get("omega_norm") or max(np.abs(ev).max(), abs(nxt)) or 1.0
            d = np.maximum((nxt - ev) / scale, floor)
            i = np.arange(1, len(ev) + 1)
            color = cmap(norm(layer)) if layer is not None else "0.4"
            ax.plot(i, d, color=color, linewidth=0.8)
            neg = ev < 0
            ax.plot(i[neg], d[neg], linestyle="none", marker="o", markersize=2.5, color=color)
            ax.plot(i[~neg], d[~neg], linestyle="none", marker="o", markersize=3.5, markerfacecolor="none",
                    color=color)
            if name in poor:
                poor_x.append(len(ev))
                poor_y.append(d[-1])
        ax.set_yscale("log")
        ax.axhline(POOR_GAP_REL, color="crimson", linewidth=0.8, linestyle="--", label="poor-gap threshold")
        ks = {len(r.get("eigenvalues") or []) for _, _, r in rows} - {0}
        cut = rank if rank else (max(ks) if ks else None)
        if cut:
            ax.axvline(cut + 0.5, color="crimson", linewidth=0.8, linestyle=":", label="the cut")
        if poor_x:
            ax.plot(poor_x, poor_y, linestyle="none", marker="x", markersize=7, color="crimson", label="poor init")
        n_poor = sum(n in poor for _, n, _ in rows)
        ax.set_title(f"{kind} ({count(len(rows), 'module')}" + (f", {n_poor} poor)" if n_poor else ")"), fontsize=9)
        ax.set_xlabel("i", fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("(λ_r+1 − λ_i) / ‖Ω‖₂", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    if layers:
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=[a for a in axes.flat if a.get_visible()], label="layer", shrink=0.8)
    fig.suptitle(f"LoRA-DA: distance of λ_1..λ_r below λ_r+1 (last point: the gap at the cut r = {rank or '?'}); "
                 "open: λ_i ≥ 0, red ×: poor init", fontsize=9)
    return fig


def save_figure(report: dict, path: str | os.PathLike) -> None:
    """:func:`figure` as an image at ``path`` (its format from the suffix, PNG without
    one), written whole: ``savefig`` writes in place, so a full disk would otherwise
    leave a truncated image."""
    plt = pyplot()
    fig = figure(report)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=Path(path).suffix or ".png")
    finally:
        plt.close(fig)
