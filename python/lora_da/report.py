"""The report: how an adapter was made and how good each module's solve is (SPEC §5, "The report").

One schema, versioned, for the API (``lora_da_report.json`` written beside a
PEFT adapter by ``save_pretrained``) and the CLI (``solve``/``init``/``report``):
:func:`build_report` is the only place its keys are spelt.
"""

from __future__ import annotations

REPORT_NAME = "lora_da_report.json"
REPORT_FORMAT = "lora-da-report"
# 2: one schema for the API and the CLI (issue 21): "version", "rank", "omega_norm",
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
    import lora_da

    modules = {name: module_report(r, None if stats is None else stats.modules.get(name))
               for name, r in results.items()}
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "init": "lora-da",
        "lora_da_version": lora_da.__version__,
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
        f"- modules with a poor init (see the report): {len(poor)}" + (f" ({', '.join(poor[:5])}…)" if poor else ""),
        f"- every setting and each module's diagnostics: `{REPORT_NAME}` "
        f"(format `{REPORT_FORMAT}` version {report.get('version')})",
        "",
    ]
    return "\n".join(lines)
