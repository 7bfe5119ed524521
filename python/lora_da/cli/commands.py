"""The commands: each checks its arguments and outputs before any work, then calls the
library (:func:`lora_da.collect.collect_statistics`, :func:`lora_da.pipeline.compute_init`,
:func:`lora_da.gamma.search_gamma`, :mod:`lora_da.report`, :func:`lora_da.demo.run_demo`)
and writes through the output safety net (:mod:`lora_da.cli.outputs`)."""

from __future__ import annotations

import time
from pathlib import Path

from lora_da.cli.models import (
    check_device,
    check_head_not_targeted,
    check_model_dir,
    load_model_checked,
    model_failure,
    modules_to_save,
    parse_targets,
    refuse_head_targets,
    refuse_task_heads,
    solve_device,
)
from lora_da.cli.outputs import (
    Writing,
    check_checkpoint_arg,
    check_writable,
    guard_outputs,
    overlaps,
    prepare_out,
    task_type,
    write_outputs,
)
from lora_da.data import all_labels, infer_task, make_batches, read_data
from lora_da.data import num_labels as count_labels
from lora_da.errors import CLIError
from lora_da.report import build_report, format_table, load_report, pyplot, save_figure
from lora_da.words import count


def _collect(args, search: bool = False):
    """Statistics of the calibration data; with ``search`` (``--gamma auto``) the
    last fifth of the samples is held back from them, and the model, the
    calibration batches and the held-back batches are returned too."""
    from lora_da.collect import collect_statistics
    from lora_da.errors import LoraDAError

    check_model_dir(args.model_dir)
    check_device(args.device, "--device")
    if args.task is None:
        args.task = infer_task(args.data, args.model_dir)
    if args.task == "seq-cls" and args.token_mask == "labels":
        raise CLIError("--token-mask labels keeps the tokens whose next-token label is set (a causal LM); seq-cls has "
                       "one class label per sample: use --token-mask attention")
    texts, labels = read_data(args.data, args.task, args.max_samples)
    targets = parse_targets(args.targets)
    requested = getattr(args, "num_labels", None)
    if requested is not None and args.task != "seq-cls":
        raise CLIError(f"--num-labels sizes a classification head: it needs --task seq-cls, not {args.task}")
    num_labels = count_labels(args.data, all_labels(args.data), args.model_dir, requested) if labels else None
    if search:
        k = max(1, len(texts) // 5)
        if len(texts) - k < 1:
            raise CLIError(f"--gamma auto holds back a fifth of the samples to score γ; {args.data} has only {len(texts)}")
        texts, held_texts = texts[:-k], texts[-k:]
        labels, held_labels = (labels[:-k], labels[-k:]) if labels is not None else (None, None)
    model, tokenizer, new_weights = load_model_checked(args.model_dir, args.task, num_labels, args.device, args.quiet,
                                                        args.seed)
    check_head_not_targeted(model, targets, new_weights, args.task)
    batches = make_batches(tokenizer, texts, labels, args.batch_size, args.max_length, args.task)
    checkpoint = getattr(args, "checkpoint", None)
    try:
        stats = collect_statistics(
            model,
            batches,
            targets,
            token_mask=args.token_mask,
            output_fisher=args.output_fisher or "diagonal",
            max_samples=args.max_samples,
            progress=not args.quiet,
            checkpoint_path=checkpoint,
            checkpoint_every=args.checkpoint_every if checkpoint else None,
        )
    except (LoraDAError, CLIError, OSError, KeyboardInterrupt):
        raise
    except Exception as e:  # the model's own failure (an IndexError past its positions, ...): one line
        raise CLIError(model_failure(args, model, batches, e)) from e
    stats.config.setdefault("task", args.task)
    stats.config["seed"] = args.seed
    stats.new_weights = new_weights
    tokens = sum(f.tokens for f in stats.input_factors.values())
    groups = len(stats.input_factors)
    print(
        f"lora-da: collected {count(len(stats.modules), 'module')} ({count(groups, 'input group')}), "
        f"{count(stats.n_samples, 'sample')}, {count(tokens, 'token')} (summed over input groups)"
    )
    if search:
        held = make_batches(tokenizer, held_texts, held_labels, args.batch_size, args.max_length, args.task)
        return stats, (model, batches, held)
    return stats


def _search_gamma(args, stats, model, calibration, held):
    """``--gamma auto``: :func:`lora_da.gamma.search_gamma` on one PeftModel whose
    trainable weights are reset before each candidate (no copy of the model)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from lora_da.gamma import search_gamma, unit_state_dict
    from lora_da.pipeline import compute_init
    from lora_da.quality import PoorInitWarning

    config = _config(args, stats)
    with warnings.catch_warnings():  # the final solve (_solve) says it, once
        warnings.simplefilter("ignore", PoorInitWarning)
        unit = unit_state_dict(compute_init(stats, config, progress=False, device=solve_device(args.solve_device)),
                               config.gamma)
    peft_model = get_peft_model(model, LoraConfig(
        r=config.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora, lora_dropout=0.0,
        target_modules=sorted(stats.modules), modules_to_save=modules_to_save(stats),
        fan_in_fan_out=any(stats.modules[n].kind == "conv1d" for n in stats.modules)))
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    def fresh():
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        return peft_model

    print(f"lora-da: choosing γ on {sum(len(b['input_ids']) for b in held)} held-back samples "
          f"after {GAMMA_SEARCH_STEPS} AdamW steps (lr {GAMMA_SEARCH_LR:g}) on the calibration batches")
    found = search_gamma(fresh, unit, calibration, held, config, steps=GAMMA_SEARCH_STEPS, lr=GAMMA_SEARCH_LR,
                         seed=args.seed)
    print(found.describe())
    print(f"lora-da: chose γ = {found.best:g}")
    if found.verdict():
        print(f"lora-da: note: {found.verdict()}")
    return found


GAMMA_SEARCH_STEPS = 5
GAMMA_SEARCH_LR = 5e-4


def _report(args, stats, inits, config) -> dict:
    """The report of this solve (:func:`lora_da.report.build_report`), with how ``--gamma
    auto`` chose γ when it did."""
    report = build_report(inits, config, stats=stats)
    found = getattr(args, "gamma_search", None)
    if found is not None:
        report["gamma_search"] = {"chosen": found.best, "steps": GAMMA_SEARCH_STEPS, "lr": GAMMA_SEARCH_LR,
                                  "table": [{"gamma": g, "loss_at_0": a, "loss_after": b} for g, a, b in found.table],
                                  "at_edge": found.at_edge(), "within_noise": found.within_noise(),
                                  "verdict": found.verdict() or None,
                                  "next_grid": found.next_grid() if found.at_edge() else None}
    return report


def _config(args, stats=None):
    from lora_da.init import LoraDAConfig

    if args.n_pop is None:
        raise ValueError("--n-pop is required (the number of fine-tuning samples)")
    fisher = args.output_fisher
    if fisher is None:
        fisher = (stats.config.get("output_fisher") if stats is not None else None) or "diagonal"
    return LoraDAConfig(
        n_pop=args.n_pop,
        rank=args.rank,
        alpha=args.alpha,
        beta=args.beta,
        damping=args.damping,
        gamma=1.0 if args.gamma == "auto" else args.gamma,  # auto: searched after the collection
        normalize=not args.no_normalize,
        method=args.method,
        output_fisher=fisher,
        token_mask=getattr(args, "token_mask", None) or "attention",
    )


def _validate_solve_options(args) -> None:
    """Every solve option, before any statistics or model is read: a bad γ, β, α or
    damping used to surface only after the whole collection pass."""
    import math

    from lora_da._core import check_solve_options

    kwargs = _config(args).solve_kwargs()
    if kwargs["rank"] >= 2**63:  # the core counts in 64 bits: past that, a number it cannot read
        raise CLIError(f"--rank must be less than 2⁶³, got {str(kwargs['rank'])[:12]}…")
    # the core's own rules and messages, not a copy here that could drift
    check_solve_options(**kwargs)
    solve_device(args.solve_device)
    lora_alpha = getattr(args, "lora_alpha", None)
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        # PEFT takes any float; NaN or a negative scale gives NaN or sign-flipped logits
        raise CLIError(f"--lora-alpha must be a finite number > 0, got {lora_alpha}")


def _solve(args, stats):
    import warnings

    from lora_da.pipeline import compute_init
    from lora_da.quality import PoorInitWarning

    config = _config(args, stats)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # said below, one line per module, instead of Python's warning with a source line
        warnings.simplefilter("ignore", PoorInitWarning)
        inits = compute_init(stats, config, progress=not args.quiet, device=solve_device(args.solve_device))
    print(f"lora-da: solved {count(len(inits), 'module')} in {time.perf_counter() - t0:.2f} s (rank {config.rank}, γ {config.gamma:g})")
    # on stdout with the other progress lines: stderr carries a failed command's one error line
    poor = {name: init.warnings for name, init in inits.items() if init.warnings}
    for name, msgs in poor.items():
        for msg in msgs:
            print(f"lora-da: warning: poor init: {name}: {msg}")
    if poor:
        print(f"lora-da: warning: {len(poor)} of {count(len(inits), 'module')} {'has' if len(poor) == 1 else 'have'} "
              "a poor init (SPEC §5); the report lists them")
    return inits, config


def cmd_collect(args) -> int:
    out = Path(args.out)
    guard_outputs(args, [(out, "statistics")])
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory for the output")
    check_writable(out)
    check_checkpoint_arg(args, [out])
    stats = _collect(args)
    with Writing(out):
        stats.save(out)
    print(f"lora-da: wrote statistics to {out}")
    return 0


def _no_auto_gamma(args) -> None:
    if args.gamma == "auto":
        raise CLIError("--gamma auto trains briefly on held-back data, so it needs the model: use "
                       "'lora-da init MODEL_DIR DATA --gamma auto'")


def cmd_solve(args) -> int:
    from lora_da.statistics import Statistics

    _no_auto_gamma(args)
    if not Path(args.stats).is_file():
        raise FileNotFoundError(f"{args.stats}: no such statistics file")
    _validate_solve_options(args)
    prepare_out(args)
    stats = Statistics.load(args.stats)
    refuse_head_targets(sorted(set(stats.modules) & set(modules_to_save(stats) or ())))
    refuse_task_heads(stats.modules, task_type(args, stats))
    inits, config = _solve(args, stats)
    with Writing(args.out):
        write_outputs(args, stats, inits, config, _report(args, stats, inits, config))
    return 0


def cmd_init(args) -> int:
    _validate_solve_options(args)  # before the expensive pass
    prepare_out(args)
    check_checkpoint_arg(args, [Path(args.out)] + ([Path(args.save_stats)] if args.save_stats else []))
    if args.gamma == "auto":
        stats, (model, calibration, held) = _collect(args, search=True)
        from lora_da.errors import LoraDAError

        try:
            found = _search_gamma(args, stats, model, calibration, held)
        except (LoraDAError, CLIError, OSError):
            raise
        except Exception as e:  # the model's own failure in the AdamW steps: one line, as in the pass
            raise CLIError(model_failure(args, model, calibration + held, e)) from e
        del model, calibration, held
        args.gamma, args.gamma_search = found.best, found
    else:
        stats = _collect(args)
    if args.save_stats:
        with Writing(args.save_stats):
            stats.save(args.save_stats)
        print(f"lora-da: wrote statistics to {args.save_stats}")
    inits, config = _solve(args, stats)
    with Writing(args.out):
        write_outputs(args, stats, inits, config, _report(args, stats, inits, config))
    return 0


def cmd_report(args) -> int:
    from lora_da.statistics import Statistics

    _no_auto_gamma(args)
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if args.plot:
        pyplot()  # before the solve, not after it
    if args.plot and overlaps(Path(args.plot), path):
        raise CLIError(f"--plot {args.plot} would write over the input {path}")
    report = load_report(path)
    if report is None:
        if args.n_pop is None:
            raise ValueError("report on a statistics file needs --n-pop (it solves first)")
        _validate_solve_options(args)
        stats = Statistics.load(path)
        inits, config = _solve(args, stats)
        report = build_report(inits, config, stats=stats)
    cfg = report.get("config", {})
    print(
        f"lora-da report: {count(len(report['modules']), 'module')}, {report.get('n_samples', '?')} samples, "
        f"rank {cfg.get('rank', '?')}, n_pop {cfg.get('n_pop', '?')}, γ {cfg.get('gamma', '?')}"
    )
    print(format_table(report))
    if args.plot:
        with Writing(args.plot):
            save_figure(report, args.plot)
        print(f"lora-da: wrote {args.plot}")
    return 0


def cmd_demo(args) -> int:
    """``lora-da demo``: check ``--gamma``, then run :func:`lora_da.demo.run_demo`."""
    gamma_fixed = None
    if args.gamma != "auto":
        try:
            gamma_fixed = float(args.gamma)
        except ValueError:
            raise ValueError(f"--gamma must be 'auto' or a number, got {args.gamma!r}") from None
        if not gamma_fixed > 0:
            raise ValueError(f"--gamma must be > 0, got {gamma_fixed}")
    from lora_da.demo import run_demo

    return run_demo(samples=args.samples, eval_samples=args.eval_samples, steps=args.steps, gamma=gamma_fixed,
                    seed=args.seed)
