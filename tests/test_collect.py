"""`collect_statistics` against brute force (SPEC §2).

Brute force: each sample alone, its own loss `ℓ_s` (mean next-token CE),
`torch.autograd.grad` with respect to each weight for `∂ℓ_s/∂W`, and the
module's inputs / output gradients captured for that one sample and summed
in float64 over the valid tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, brute_force, data, tiny_gpt2, tiny_llama

import lora_da
from lora_da.collect import causal_lm_per_sample_loss

def check(stats, brute, T, rtol):
    for name, (G, Z, y) in brute.items():
        assert stats.output_factors[name].tokens == T
        assert stats.input_factors[stats.modules[name].input_group].tokens == T
        np.testing.assert_allclose(stats.mean_grad(name), G, rtol=0, atol=rtol * np.abs(G).max())
        np.testing.assert_allclose(stats.input_factor(name), Z, rtol=0, atol=rtol * np.abs(Z).max())
        np.testing.assert_allclose(stats.output_factor(name), y, rtol=0, atol=rtol * np.abs(y).max())


@pytest.mark.parametrize("bs", [1, 4, 6])
def test_llama_statistics_match_per_sample_autograd(bs):
    model = tiny_llama()
    ids, mask = data()
    stats = lora_da.collect_statistics(model, batches(ids, mask, bs), LLAMA_TARGETS, progress=False)
    names = list(stats.modules)
    assert len(names) == 14 and stats.n_samples == 6
    brute, T = brute_force(model, ids, mask, names)
    check(stats, brute, T, 1e-10)
    # parameters got no .grad and keep requires_grad
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_batch_size_invariance_with_padding_float32():
    model = tiny_llama(torch.float32)
    ids, mask = data()
    a = lora_da.collect_statistics(model, batches(ids, mask, 1), LLAMA_TARGETS, progress=False)
    b = lora_da.collect_statistics(model, batches(ids, mask, 4), LLAMA_TARGETS, progress=False)
    c = lora_da.collect_statistics(model, batches(torch.cat([ids] * 3), torch.cat([mask] * 3), 16), LLAMA_TARGETS,
                                   progress=False, max_samples=6)
    for s in (b, c):
        for n in a.modules:
            for f in (a.mean_grad, a.input_factor, a.output_factor):
                ref = f(n)
                got = getattr(s, f.__name__)(n)
                assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_shared_inputs_are_detected_from_tensors():
    stats = lora_da.collect_statistics(tiny_llama(), batches(*data(), 3), LLAMA_TARGETS, progress=False)
    groups = sorted(sorted(v) for v in stats.groups().values())
    assert ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"] in groups
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in groups
    assert ["model.layers.0.mlp.down_proj"] in groups
    assert len(stats.input_factors) == 8


def test_gpt2_conv1d_statistics_match_per_sample_autograd():
    model = tiny_gpt2()
    ids, mask = data()
    stats = lora_da.collect_statistics(model, batches(ids, mask, 3), ["c_attn", "c_proj", "c_fc"], progress=False)
    info = stats.modules["transformer.h.0.attn.c_attn"]
    assert info.kind == "conv1d" and (info.out_features, info.in_features) == (72, 24)
    brute, T = brute_force(model, ids, mask, list(stats.modules))
    check(stats, brute, T, 1e-10)


def test_bf16_model_statistics_are_float64_and_close():
    ids, mask = data()
    ref = lora_da.collect_statistics(tiny_llama(torch.float32), batches(ids, mask, 3), ["down_proj"], progress=False)
    got = lora_da.collect_statistics(tiny_llama(torch.bfloat16), batches(ids, mask, 3), ["down_proj"], progress=False)
    for n in ref.modules:
        assert got.mean_grad(n).dtype == np.float64 and got.input_factor(n).dtype == np.float64
        for f in ("mean_grad", "input_factor", "output_factor"):
            a, b = getattr(ref, f)(n), getattr(got, f)(n)
            assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(a), f


class TwiceLinear(torch.nn.Module):
    """One Linear applied twice per forward (like a tied weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = self.lin(torch.tanh(self.lin(h)))
        return self.head(h)


def twice_loss(model, batch):
    logits = model(batch["input_ids"])
    return causal_lm_per_sample_loss(logits, batch["input_ids"])


def test_module_called_twice_counts_both_calls_once():
    model = TwiceLinear().double()
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    stats = lora_da.collect_statistics(model, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}], ["lin"],
                                       loss_fn=twice_loss, progress=False)
    G, Z, y, T = 0, 0, 0, 0
    for s in range(4):
        xs, outs = [], []

        def hook(m, a, o):
            xs.append(a[0].detach())
            o.retain_grad()
            outs.append(o)

        h = model.lin.register_forward_hook(hook)
        loss = twice_loss(model, {"input_ids": ids[s:s + 1]})[0]
        grads = torch.autograd.grad(loss, [model.lin.weight] + outs)
        h.remove()
        G = G + grads[0].detach().numpy()
        for x, g in zip(xs, grads[1:]):
            Z = Z + x[0].numpy().T @ x[0].numpy()
            y = y + (g[0].detach().numpy() ** 2).sum(0)
            T += x.shape[1]
    assert stats.input_factors["lin"].tokens == T == 48
    np.testing.assert_allclose(stats.mean_grad("lin"), G / 4, atol=1e-12)
    np.testing.assert_allclose(stats.input_factor("lin"), Z / T, atol=1e-12)
    np.testing.assert_allclose(stats.output_factor("lin"), y / T, atol=1e-14)


@pytest.mark.parametrize("accumulate_on", ["host", "device"])
def test_gradient_checkpointing_does_not_double_count(accumulate_on):
    ids, mask = data()
    plain = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["o_proj"], progress=False)
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *a: calls.append(1))
    # in eval mode too: the collection keeps the checkpointed layers checkpointing (the memory a user asked for)
    ckpt = lora_da.collect_statistics(model, batches(ids, mask, 3), ["o_proj"], progress=False,
                                      accumulate_on=accumulate_on)
    probe = accumulate_on == "device"  # the planned path runs the first batch once more to measure it
    assert len(calls) == 2 * (2 + probe)  # each forward recomputed in backward: the recompute happened
    assert not model.training and not model.model.layers[0].training  # modes restored
    for n in plain.modules:
        assert ckpt.input_factors[ckpt.modules[n].input_group].tokens == plain.input_factors[plain.modules[n].input_group].tokens
        np.testing.assert_allclose(ckpt.mean_grad(n), plain.mean_grad(n), atol=1e-12)
        np.testing.assert_allclose(ckpt.input_factor(n), plain.input_factor(n), atol=1e-12)


@pytest.mark.parametrize("accumulate_on", ["host", "device"])
def test_collection_builds_no_generation_cache_and_restores_the_flag(accumulate_on):
    """A decoder's key/value cache is memory no statistic needs (on a GPU, a pass whose
    graph starts high up held every lower layer's cache beside its plan): collection runs
    with ``use_cache`` off and gives the user's setting back, after an error too."""
    model = tiny_llama()
    assert model.config.use_cache is True
    caches = []
    model.register_forward_hook(lambda mod, args, out: caches.append(out.past_key_values))
    ids, mask = data()
    lora_da.collect_statistics(model, batches(ids, mask, 3), ["o_proj"], progress=False, accumulate_on=accumulate_on)
    assert caches and all(c is None for c in caches)
    assert model.config.use_cache is True
    assert model(input_ids=ids[:1]).past_key_values is not None  # the user's forward caches again

    def failing(model, batch):
        raise RuntimeError("loss_fn failed")

    with pytest.raises(RuntimeError, match="loss_fn failed"):
        lora_da.collect_statistics(model, batches(ids, mask, 3), ["o_proj"], loss_fn=failing, progress=False,
                                   accumulate_on=accumulate_on)
    assert model.config.use_cache is True


def test_configs_that_refuse_the_change_or_hold_other_true_values_leave_the_model_restored():
    """A custom module's ``config`` may not be transformers': one that refuses ``use_cache``
    (a read-only property) keeps its cache and stops nothing else from being given back; a
    truthy value other than ``True`` is turned off and comes back as it was."""
    from types import SimpleNamespace

    from lora_da.collect.hooks import frozen

    class ReadOnly:
        use_cache = property(lambda self: True)

    model = tiny_llama()
    model.train()
    model.model.layers[0].config = ReadOnly()
    model.model.layers[1].config = SimpleNamespace(use_cache=1)
    with frozen(model):
        assert model.config.use_cache is False and model.model.layers[1].config.use_cache is False
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is True and model.model.layers[1].config.use_cache == 1


def labeled_data():
    """Prompt tokens carry no label; sample 3 (4 tokens) has no labeled token at all."""
    ids, mask = data()
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def test_label_token_mask_and_sequence_lowrank_match_per_sample_autograd():
    model = tiny_llama()
    ids, mask, labels = labeled_data()
    b = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": labels[i:i + 3]} for i in (0, 3)]
    stats = lora_da.collect_statistics(model, b, ["q_proj", "down_proj"], token_mask="labels",
                                       output_fisher="sequence_lowrank", progress=False)
    names = list(stats.modules)
    brute, T = brute_force(model, ids, mask, names, labels=labels)
    assert T == int((labels[:, 1:] != -100).sum())
    for name, (G, Z, y, u) in brute.items():
        assert stats.output_factors[name].tokens == T
        assert stats.input_factors[stats.modules[name].input_group].tokens == T
        np.testing.assert_allclose(stats.mean_grad(name), G, rtol=0, atol=1e-10 * np.abs(G).max())
        np.testing.assert_allclose(stats.input_factor(name), Z, rtol=0, atol=1e-10 * np.abs(Z).max())
        np.testing.assert_allclose(stats.output_factor(name), y, rtol=0, atol=1e-10 * np.abs(y).max())
        got_u = stats.output_factors[name].sample_sums()
        assert got_u.shape == u.shape == (6, stats.modules[name].out_features)
        assert np.all(u[3] == 0)  # the sample without a labeled token
        np.testing.assert_allclose(got_u, u, rtol=0, atol=1e-10 * np.abs(u).max())


def test_compute_init_with_sequence_lowrank_matches_reference():
    """End to end: the solve uses diag((λI + UUᵀ/N)⁻¹) of the collected u_s in
    place of 1/(y + λ), as the SciPy reference with a dense inverse does."""
    from helpers import check_against_reference

    from lora_da.reference import lowrank_output_precision, reference_solve

    ids, mask, labels = labeled_data()
    b = [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2, 4)]
    stats = lora_da.collect_statistics(tiny_llama(), b, ["q_proj", "down_proj"], token_mask="labels",
                                       output_fisher="sequence_lowrank", progress=False)
    opts = dict(rank=4, n_pop=1000.0, damping=1e-4, gamma=16.0)
    for method in ("auto", "krylov"):
        cfg = lora_da.LoraDAConfig(n_pop=1000, rank=4, damping=1e-4, gamma=16.0, token_mask="labels",
                                   output_fisher="sequence_lowrank", method=method)
        inits = lora_da.compute_init(stats, cfg, progress=False)
        assert set(inits) == set(stats.modules)
        for name, init in inits.items():
            u = stats.output_factors[name].sample_sums()
            precision = lowrank_output_precision(u, 1e-4)
            Z, y, G = stats.input_factor(name), stats.output_factor(name), stats.mean_grad(name)
            ref = reference_solve(Z, y, G, output_precision=precision, **opts)
            check_against_reference(init.result, ref, Z, opts)
            # and not the diagonal Fisher's answer
            diag = reference_solve(Z, y, G, **opts)
            assert abs(init.result.c - diag.c) > 1e-6 * diag.c


def test_statistics_save_load_round_trip(tmp_path):
    stats = lora_da.collect_statistics(tiny_llama(), batches(*data(), 3), ["q_proj", "v_proj"], progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = lora_da.Statistics.load(path)
    assert back.n_samples == stats.n_samples and back.modules == stats.modules
    for n in stats.modules:
        np.testing.assert_array_equal(back.mean_grad(n), stats.mean_grad(n))
        np.testing.assert_array_equal(back.input_factor(n), stats.input_factor(n))
        np.testing.assert_array_equal(back.output_factor(n), stats.output_factor(n))
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary left behind


def test_bad_statistics_files(tmp_path):
    stats = lora_da.collect_statistics(tiny_llama(), batches(*data(), 3), ["q_proj"], progress=False)
    good = tmp_path / "s.safetensors"
    stats.save(good)
    raw = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("trunc.safetensors", "junk.safetensors", "missing.safetensors"):
        with pytest.raises(lora_da.StatisticsFileError):
            lora_da.Statistics.load(tmp_path / name)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(lora_da.StatisticsFileError, match="header"):
        lora_da.Statistics.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("accumulate_on", ["host", "device"])
def test_every_target_modules_form_selects_the_modules_and_their_statistics(accumulate_on):
    """``target_modules`` as PEFT takes it: None and "all-linear" (every linear layer but the
    head), a regular expression over full names, a list of full names, a list of suffixes.
    Each form selects the modules a plain walk of the model finds, and each selected module's
    statistics are those of the same module under another form, bit for bit; a regular
    expression that picks two modules of one input keeps them in one group."""
    model = tiny_llama()
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    ids, mask = data()

    def collect(targets):
        return lora_da.collect_statistics(model, batches(ids, mask, 3), targets, progress=False,
                                          accumulate_on=accumulate_on)

    whole = collect(LLAMA_TARGETS)  # suffixes
    assert sorted(whole.modules) == linears
    q, k = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"
    two = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    forms = [(None, linears), ("all-linear", linears), (r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", linears),
             (linears, linears), (r"model\.layers\.1\.self_attn\.(q|k)_proj", [k, q]), (two, two)]
    for form, want in forms:
        st = collect(form)
        assert sorted(st.modules) == want, form
        for n in want:
            for f in ("mean_grad", "input_factor", "output_factor"):
                assert np.array_equal(getattr(st, f)(n), getattr(whole, f)(n)), (form, n, f)
        if want == [k, q]:
            assert list(st.groups().values()) == [[q, k]]


def test_bad_targets_and_data():
    model = tiny_llama()
    with pytest.raises(lora_da.InvalidArgumentError, match="matches no module"):
        lora_da.collect_statistics(model, batches(*data(), 3), ["nope"], progress=False)
    with pytest.raises(lora_da.InvalidArgumentError, match="not linear"):
        lora_da.collect_statistics(model, batches(*data(), 3), ["input_layernorm"], progress=False)
    with pytest.raises(lora_da.InvalidArgumentError, match="no sample"):
        lora_da.collect_statistics(model, [], ["q_proj"], progress=False)
    ids, mask = data()
    with pytest.raises(lora_da.InvalidArgumentError, match="no valid token"):
        lora_da.collect_statistics(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(mask)}], ["q_proj"], progress=False)
