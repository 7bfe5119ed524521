"""What several test files share: tiny models and data, the brute-force and
reference checks, the trainer setup. Fixtures live in conftest.py.

Plain functions in an importable module (``from helpers import ...``), because
the subprocess tests (test_distributed.py, test_collect_resume.py,
test_adapters_trainer.py) put this folder on ``sys.path`` in the scripts they
spawn and import the same helpers by name.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Trainer, TrainingArguments)

import lora_da
from lora_da import GAP_REL, GAP_TOL
from lora_da.collect import causal_lm_per_sample_loss, linear_kind
from lora_da.reference import fix_signs, subspace_sin_theta

# -- tiny models and data (SPEC §2's collection runs on these) ------------------------------

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float64):
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def units_7b(layers=4):
    """The Llama-2-7B shape's input groups (the planner's view), ``layers`` of them."""
    from lora_da.plan import Unit

    out = []
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [Unit(p + "q", 4096, ((p + "q", 4096), (p + "k", 4096), (p + "v", 4096))),
                Unit(p + "o", 4096, ((p + "o", 4096),)),
                Unit(p + "gate", 4096, ((p + "gate", 11008), (p + "up", 11008))),
                Unit(p + "down", 11008, ((p + "down", 4096),))]
    return out


def data(n=6, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i, keep in enumerate([9, 6, 9, 4, 7, 9][:n]):
        mask[i, keep:] = 0  # right padding
    return ids, mask


def batches(ids, mask, bs):
    return [{"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs]} for i in range(0, len(ids), bs)]


# -- statistics: brute force and equality ------------------------------------------------------


def brute_force(model, ids, mask, names, labels=None):
    """Per-sample autograd: Ḡ, Z, y and counts in float64. With ``labels``
    (token_mask="labels", SPEC §2) the valid tokens are those whose next-token
    label is not -100, and each sample's ``u_s = Σ_{t valid} g_t`` comes too."""
    mods = dict(model.named_modules())
    G = {n: 0.0 for n in names}
    Zs = {n: 0.0 for n in names}
    ys = {n: 0.0 for n in names}
    us = {n: [] for n in names}
    T = 0
    for s in range(len(ids)):
        L = int(mask[s].sum())
        if labels is None:
            sample_labels, valid = ids[s:s + 1, :L], list(range(L))
        else:
            sample_labels = labels[s:s + 1, :L]
            valid = [t for t in range(L - 1) if int(labels[s, t + 1]) != -100]
        x_in, outs = {}, {}

        def fwd(name):
            def hook(mod, args, out):
                x_in[name] = args[0]
                out.retain_grad()
                outs[name] = out
            return hook

        hs = [mods[n].register_forward_hook(fwd(n)) for n in names]
        logits = model(input_ids=ids[s:s + 1, :L]).logits
        loss = causal_lm_per_sample_loss(logits, sample_labels)[0]
        weights = [mods[n].weight for n in names]
        grads = torch.autograd.grad(loss, weights + [outs[n] for n in names])
        for h in hs:
            h.remove()
        for k, n in enumerate(names):
            gw = grads[k].double()
            if linear_kind(mods[n]) == "conv1d":
                gw = gw.T
            G[n] = G[n] + gw.numpy()
            x = x_in[n][0].detach().double().numpy()[valid]
            g = grads[len(names) + k][0].double().numpy()[valid]
            Zs[n] = Zs[n] + x.T @ x
            ys[n] = ys[n] + (g * g).sum(0)
            us[n].append(g.sum(0))
        T += len(valid)
    N = len(ids)
    if labels is None:
        return {n: (G[n] / N, Zs[n] / T, ys[n] / T) for n in names}, T
    return {n: (G[n] / N, Zs[n] / T, ys[n] / T, np.array(us[n])) for n in names}, T


TARGETS = ["q_proj", "down_proj"]


def many_batches():
    ids, mask = data()
    ids = torch.cat([ids, ids.flip(0), ids.roll(1, 1)])
    mask = torch.cat([mask, mask.flip(0), mask])
    return batches(ids, mask, 2)  # 9 batches


def assert_same_statistics(a, b, exact_grad=True):
    assert a.n_samples == b.n_samples and a.modules == b.modules
    for n in a.modules:
        if exact_grad:
            np.testing.assert_array_equal(a.mean_grad(n), b.mean_grad(n))
        np.testing.assert_allclose(a.input_factor(n), b.input_factor(n), rtol=1e-15, atol=0)
        np.testing.assert_allclose(a.output_factor(n), b.output_factor(n), rtol=1e-15, atol=0)
        assert a.output_factors[n].tokens == b.output_factors[n].tokens


# -- the planner's units and the device sums they allocate (test_memory_plan, test_gpu) -----------


def sums_units():
    """Input groups of one and of several modules, n below, above and at twice the Gram's block size."""
    from lora_da.plan import Unit

    return [Unit("a", 40, (("a", 24),)), Unit("b", 1100, (("b", 8), ("b2", 16))), Unit("c", 2048, (("c", 3),))]


def device_sums_of(units, device):
    """The float64 sums one pass of ``units`` allocates on ``device`` (no model: only the
    fields DeviceSums reads of a target)."""
    from types import SimpleNamespace

    from lora_da.collect.device_sums import DeviceSums

    targets = {name: SimpleNamespace(m=m, n=u.n) for u in units for name, m in u.modules}
    groups = {name: u.group for u in units for name, _ in u.modules}
    return DeviceSums(units, targets, groups, device, per_sample=False)


# -- the solve against the SciPy reference (SPEC §3, §5) --------------------------------------

EPS = np.finfo(np.float64).eps


def certified_tol(Z: np.ndarray, damping: float) -> float:
    w = np.linalg.eigvalsh(Z + damping * np.eye(Z.shape[0]))
    cond = w[-1] / max(w[0], np.finfo(float).tiny)
    return 1e-10 + 64 * cond * EPS


def check_against_reference(res, ref, Z, opts):
    r = opts["rank"]
    tol = certified_tol(Z, opts["damping"])
    norm = ref.omega_norm
    # the solver's own report meets the contract
    assert res.residual <= 1e-10
    # residual of our vectors on the reference Ω
    R = ref.omega @ res.V - res.V * res.eigenvalues[None, :]
    assert np.linalg.norm(R, axis=0).max() / norm <= 10 * tol
    # eigenvalues, gap
    np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=10 * tol * norm)
    # λ_{r+1} only measures the gap: the Krylov path takes its Ritz value (an
    # upper bound of the eigenvalue) to a residual of GAP_TOL·‖Ω‖ or GAP_REL of
    # the gap, whichever is larger; the dense path computes it exactly
    err = res.next_eigenvalue - ref.next_eigenvalue
    bound = 2 * max(GAP_TOL * norm, GAP_REL * res.gap) + 10 * tol * norm
    assert -10 * tol * norm <= err <= bound
    # orthonormal V, sign convention, A = Vᵀ/√γ
    np.testing.assert_allclose(res.V.T @ res.V, np.eye(r), atol=1e-12)
    np.testing.assert_array_equal(fix_signs(res.V), res.V)
    np.testing.assert_allclose(res.A, res.V.T / np.sqrt(opts["gamma"]), rtol=1e-15, atol=0)
    # subspace where the gap allows it (Davis–Kahan), objective otherwise
    gap = ref.gap
    objective = np.trace(res.V.T @ ref.omega @ res.V)
    assert abs(objective - ref.eigenvalues.sum()) <= 10 * r * tol * norm
    if gap >= 1e-4 * norm:
        bound = max(1e-6, 10 * tol * norm / gap)
        assert subspace_sin_theta(ref.V, res.V) <= bound
    # σ, c and B = Δ̂ᵀ V / √γ with our V
    assert abs(res.sigma - ref.sigma) <= 10 * tol * ref.sigma
    assert abs(res.c - ref.c) <= 10 * tol * ref.c
    B_expected = ref.delta_hat.T @ res.V / np.sqrt(opts["gamma"])
    scale = np.linalg.norm(ref.delta_hat, 2) / np.sqrt(opts["gamma"])
    np.testing.assert_allclose(res.B, B_expected, rtol=0, atol=10 * tol * scale)


def check_compute_init_on(device):
    """``compute_init(device=…)`` against the Rust core on the same statistics (test_collect_scale.py
    on the CPU, test_gpu.py on a GPU)."""
    ids, mask = data()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    core = lora_da.compute_init(stats, cfg, progress=False)
    dev = lora_da.compute_init(stats, cfg, progress=False, device=device)
    for n in core:
        assert subspace_sin_theta(core[n].result.V, dev[n].result.V) <= 1e-8
        assert np.abs(core[n].B - dev[n].B).max() <= 1e-8 * np.abs(core[n].B).max()


# -- the command line's vocabulary (the model_dir / data_file fixtures use it) ---------------

WORDS = "the a cat dog sat on mat ran fast slow red blue big small and or is was very good bad".split()


def word_tokenizer(d) -> int:
    """A word-level fast tokenizer over ``WORDS`` ([PAD] = 0, [UNK] = 1) saved into ``d``; its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(d)
    return len(vocab)


# -- a tiny classifier under transformers' Trainer (LoraDACallback) --------------------------


def tiny_classifier():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


class ClassifierRows(torch.utils.data.Dataset):
    def __init__(self):
        ids, mask = data()
        self.ids, self.mask, self.y = ids, mask, torch.tensor([0, 1, 1, 0, 1, 0])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


def peft_classifier():
    return get_peft_model(tiny_classifier(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"], task_type="SEQ_CLS"))


def lora_params(model) -> dict[str, np.ndarray]:
    return {n: p.detach().double().numpy().copy() for n, p in model.named_parameters() if ".lora_" in n}


def trainer_of(model, tmp_path, callback, batch=4, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=1, learning_rate=0.0,
                             weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             seed=3, **kw)
    return Trainer(model=model, args=args, train_dataset=ClassifierRows(), callbacks=[callback])
