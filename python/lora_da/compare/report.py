"""What a comparison reports: the Markdown table of each task, its verdict, the benchmark's
auto-norm bar and the loss-curve figure.

Each function reads a :class:`lora_da.compare.harness.TaskResult` (its runs per arm,
the chosen lr and scale, the γ-sensitivity runs and the arms that failed).
"""

from __future__ import annotations

import math


def log_steps(steps: int) -> list[int]:
    """Steps (1-based) at which the training loss is reported: the mean over the window ending there."""
    pts = sorted({1, max(1, steps // 10), max(1, steps // 4), max(1, steps // 2), max(1, 3 * steps // 4), steps})
    return pts


def logged(losses, steps):
    pts, out, prev = log_steps(steps), [], 0
    for p in pts:
        win = losses[prev:p] if p > 1 else losses[:1]
        out.append(sum(win) / len(win))
        prev = p
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def markdown(res) -> str:
    t, steps = res.task, res.steps
    pts = log_steps(steps)
    head = (["method", "lr", "γ/scale"] + [f"loss@{p}" for p in pts]
            + ["eval loss", f"eval {t.metric}", "init s", "train s", "peak MiB", "note"])
    seeds = sorted({r.seed for rs in res.runs.values() for r in rs})
    spread = (f"mean over seeds; ± = std of eval {t.metric} between seeds" if len(seeds) > 1
              else "one seed: no spread between seeds was measured")
    lines = [f"#### {t.name} — {steps} steps, seeds {seeds} ({spread})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in res.runs.items():
        lr, sc = res.chosen[name]
        curves = [logged(r.losses, steps) for r in rs]
        ls = [_mean([c[i] for c in curves]) for i in range(len(pts))]
        ev = [r.eval["metric"] for r in rs]
        peak = _mean([r.peak_mb for r in rs])
        row = [name, f"{lr:g}", "—" if sc is None else f"{sc:g}"] + [f"{x:.4f}" for x in ls] + [
            f"{_mean([r.eval['loss'] for r in rs]):.4f}",
            f"{_mean(ev):.4f} ± {_std(ev):.4f}" if len(ev) > 1 else f"{_mean(ev):.4f}",
            f"{_mean([r.init_s for r in rs]):.2f}", f"{_mean([r.train_s for r in rs]):.2f}",
            "n/a (CPU)" if peak is None else f"{peak:.0f}", rs[0].extra]
        lines.append("| " + " | ".join(row) + " |")
    for name, why in res.failed.items():
        lines.append(f"| {name} | — | — | " + " | ".join("—" for _ in pts) + f" | — | — | — | — | — | FAILED: {why} |")
    if res.sensitivity:
        lines += ["", f"γ sensitivity of LoRA-DA (published defaults otherwise; lr {res.chosen['LoRA-DA'][0]:g}):", "",
                  "| γ | held-back loss | " + " | ".join(f"loss@{p}" for p in pts) + f" | eval loss | eval {t.metric} |",
                  "|" + "---|" * (len(pts) + 4)]
        for g, rs in res.sensitivity.items():
            curves = [logged(r.losses, steps) for r in rs]
            ls = [_mean([c[i] for c in curves]) for i in range(len(pts))]
            lines.append(f"| {g:g} | {_mean([r.select['loss'] for r in rs]):.4f} | "
                         + " | ".join(f"{x:.4f}" for x in ls)
                         + f" | {_mean([r.eval['loss'] for r in rs]):.4f} | {_mean([r.eval['metric'] for r in rs]):.4f} |")
    return "\n".join(lines)


def verdict(res) -> str:
    """The closing line: the best arm on the held-out (eval) metric, higher is better, and
    whether its lead over the next arm exceeds the spread between seeds (the larger of
    the two arms' standard deviations); with one seed, that no spread was measured."""
    t = res.task
    means = sorted(((_mean([r.eval["metric"] for r in rs]), name, [r.eval["metric"] for r in rs])
                    for name, rs in res.runs.items()), key=lambda x: -x[0])
    if not means:
        return f"Verdict ({t.name}): no arm ran."
    best, name, ev = means[0]
    if len(means) == 1:
        return f"Verdict ({t.name}): {name} is the only arm that ran (eval {t.metric} {best:.4f})."
    tied = [n for m, n, _ in means if m == best]
    if len(tied) > 1:
        return (f"Verdict ({t.name}): no best arm on held-out {t.metric}: {', '.join(tied)} tie at {best:.4f}"
                + (" (one seed: no spread between seeds was measured)." if len(ev) < 2 else "."))
    second, other, ev2 = means[1]
    lead = best - second
    head = (f"Verdict ({t.name}): best on held-out {t.metric} is {name} ({best:.4f}), "
            f"{lead:.4f} ahead of {other} ({second:.4f}); ")
    if len(ev) < 2 or len(ev2) < 2:
        return head + ("one seed, so no spread between seeds was measured: run --seeds 3 or more "
                       "before acting on this lead.")
    spread = max(_std(ev), _std(ev2))
    if lead > spread:
        return head + f"the lead exceeds the spread between seeds ({spread:.4f}, {len(ev)} seeds)."
    return head + (f"the lead is within the spread between seeds ({spread:.4f}, {len(ev)} seeds): "
                   "no clear winner.")


def auto_norm_bar(res) -> tuple[bool, str]:
    """LoRA-DA auto-norm's logged training loss ≤ PEFT default's at every logged step, every seed."""
    a, d = res.runs.get("LoRA-DA auto-norm"), res.runs.get("PEFT default")
    if not a or not d:
        return False, "auto-norm or the PEFT default arm was not run"
    fails = []
    for ra, rd in zip(a, d):
        for p, la, ld in zip(log_steps(res.steps), logged(ra.losses, res.steps), logged(rd.losses, res.steps)):
            if la > ld:
                fails.append(f"seed {ra.seed} step {p}: {la:.4f} > {ld:.4f}")
    ok = not fails
    return ok, ("PASS" if ok else "FAIL: " + "; ".join(fails[:8]) + (" …" if len(fails) > 8 else ""))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        w = max(1, res.steps // 20)
        for name, rs in res.runs.items():
            mean = [sum(r.losses[i] for r in rs) / len(rs) for i in range(res.steps)]
            sm = [sum(mean[max(0, i - w + 1):i + 1]) / len(mean[max(0, i - w + 1):i + 1]) for i in range(res.steps)]
            ax.plot(range(1, res.steps + 1), sm, label=name, lw=2.2 if name.startswith("LoRA-DA") else 1.2,
                    ls="-" if name.startswith("LoRA-DA") else "--")
        ax.set_title(f"{res.task.name} (mean of {len(next(iter(res.runs.values())))} seeds, window {w})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
