"""Three features of SPEC §7, tested by a hostile review (each of the first six failed on the
code it reviewed; the causes are fixed): the graph started at each pass's own modules
(``Recorder(start_graph=True)``), small batches joined into larger steps (``passes.Joiner``)
and the memory-lean device solve (``torch_solve``). Each test compares the planned device
path (``accumulate_on="device"``, run on the CPU) with the host path, which back-propagates
from the embedding and adds every user batch alone, or a solve with the SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, tiny_llama

import lora_da
import lora_da.collect.passes as passes
from lora_da.collect import default_loss
from lora_da.errors import NonFiniteError

def assert_near_host(host, dev, rel, fields=("mean_grad", "input_factor", "output_factor"), names=None):
    """Each module's statistics on the device path within ``rel`` (of the largest entry) of the host path's."""
    for n in names or host.modules:
        for f in fields:
            x, y = getattr(host, f)(n), getattr(dev, f)(n)
            assert np.abs(x - y).max() <= rel * np.abs(x).max(), (n, f)


# -- the graph started at each pass's own modules ------------------------------------------


def tiny_deberta_v2():
    """DeBERTa-v2/v3's attention (share_att_key, as deberta-v3-base) also calls query_proj and
    key_proj on the relative position embeddings, a LayerNorm of a parameter: on the host path
    those calls take no gradient (nothing from the input embedding reaches them)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=32, max_position_embeddings=32, relative_attention=True,
                          position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
                          pos_att_type=["p2c", "c2p"], num_labels=2)
    return DebertaV2ForSequenceClassification(cfg).double().eval()


def deberta_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (6, 9), generator=g)
    return [{"input_ids": ids[i:i + 3], "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0])} for i in (0, 3)]


def test_deberta_v2_attention_collects_on_the_device_path_as_on_the_host():
    """q, k and v share their input (one group) on the probe; in a pass started at their inputs
    the position-embedding calls of q and k take a gradient too, so their calls no longer match
    v's and the pass refuses a model that the host path collects."""
    targets = ["query_proj", "key_proj", "value_proj"]
    host = lora_da.collect_statistics(tiny_deberta_v2(), deberta_batches(), targets, progress=False)
    dev = lora_da.collect_statistics(tiny_deberta_v2(), deberta_batches(), targets, progress=False,
                                     accumulate_on="device")
    for name in host.modules:
        assert np.allclose(host.input_factor(name), dev.input_factor(name), rtol=1e-12, atol=0)


def test_a_call_without_gradient_on_the_host_path_is_not_summed_on_the_device_path():
    """query_proj alone: the device path sums its calls on the position embeddings too (32 more
    rows in Z and Ḡ) where the host path, the reference, sums the token calls only."""
    host = lora_da.collect_statistics(tiny_deberta_v2(), deberta_batches(), ["query_proj"], progress=False)
    dev = lora_da.collect_statistics(tiny_deberta_v2(), deberta_batches(), ["query_proj"], progress=False,
                                     accumulate_on="device")
    for name in host.modules:
        g = host.modules[name].input_group
        assert dev.input_factors[g].tokens == host.input_factors[g].tokens
    assert_near_host(host, dev, 1e-12, fields=("input_factor", "mean_grad"))


class DeadBranch(torch.nn.Module):
    """A linear layer whose output the loss never reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.live, self.dead = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50)
        self.double()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        self.dead(h)
        return self.head(torch.tanh(self.live(h)))


@pytest.mark.parametrize("accumulate_on", ["host", "device"])
def test_a_module_whose_output_the_loss_never_reads_is_named(accumulate_on):
    """The host path (and the device path before the graph started at the pass's modules) names
    the module without output gradient; now a pass of such modules alone leaves the loss without
    a graph and the error blames a detached loss_fn instead."""
    ids, mask = data()
    with pytest.raises(lora_da.LoraDAError, match="module dead: no output gradient in batch 0"):
        lora_da.collect_statistics(DeadBranch(), batches(ids, mask, 3), ["dead"], progress=False,
                                   accumulate_on=accumulate_on)


# -- small batches joined ------------------------------------------------------------------


def poisoned_loss(row: torch.Tensor):
    """The default loss, infinite for the sample whose tokens are ``row``."""
    def loss(model, batch):
        out = default_loss(model, batch)
        bad = (batch["input_ids"] == row).all(1)
        return torch.where(bad, torch.full_like(out, float("inf")), out)
    return loss


def test_a_non_finite_loss_in_a_joined_step_names_its_own_batch(monkeypatch):
    """Batches of one, the fourth (index 3) with an infinite loss: the host path names batch 3,
    sample 0; a joined step names its first batch and the sample's place in the step."""
    monkeypatch.setattr(passes, "joins_batches", lambda dev: True, raising=False)
    ids, mask = data()
    rows = batches(ids, mask, 1)
    loss = poisoned_loss(ids[3])
    with pytest.raises(NonFiniteError) as host:
        lora_da.collect_statistics(tiny_llama(), rows, LLAMA_TARGETS, progress=False, loss_fn=loss)
    assert "batch 3: non-finite loss for samples [0]" in str(host.value)
    with pytest.raises(NonFiniteError) as dev:
        lora_da.collect_statistics(tiny_llama(), rows, LLAMA_TARGETS, progress=False, loss_fn=loss,
                                   accumulate_on="device")
    assert "batch 3: non-finite loss for samples [0]" in str(dev.value)


def test_joined_batches_keep_every_samples_list_entries(monkeypatch):
    """A per-sample list beside the tensors (what default_collate makes of a float or string
    column): equal in every batch of one, so joinable() joins them, and the joined step keeps
    the first batch's one-entry list for all its samples; a loss_fn that pairs the losses with
    the list's entries then returns fewer losses than samples. The host path adds each batch."""
    monkeypatch.setattr(passes, "joins_batches", lambda dev: True, raising=False)
    ids, mask = data()
    rows = [dict(r, weight=[1.0]) for r in batches(ids, mask, 1)]

    def weighted(model, batch):
        losses = default_loss(model, {k: v for k, v in batch.items() if k != "weight"})
        return torch.stack([w * s for w, s in zip(batch["weight"], losses)])

    host = lora_da.collect_statistics(tiny_llama(), rows, LLAMA_TARGETS, progress=False, loss_fn=weighted)
    dev = lora_da.collect_statistics(tiny_llama(), rows, LLAMA_TARGETS, progress=False, loss_fn=weighted,
                                     accumulate_on="device")
    assert_near_host(host, dev, 1e-13, fields=("mean_grad",))



class CalledTwice(torch.nn.Module):
    """One linear layer applied twice per forward (weight tying): two calls per sample."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.ln, self.tied = torch.nn.Embedding(50, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50)
        self.double()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        x = self.ln(self.emb(input_ids))
        return self.head(self.tied(torch.tanh(self.tied(x))) + x)


def test_per_sample_rows_of_a_module_called_twice_keep_their_order_when_batches_are_joined(monkeypatch):
    """sequence_lowrank keeps one row per call and sample: the host path (and the device path
    before joining) in batch order, each batch's first call then its second; a joined step puts
    the first call's rows of all its batches first, so the rows (and the bits of U Uᵀ) change
    with the step boundaries."""
    monkeypatch.setattr(passes, "joins_batches", lambda dev: True, raising=False)
    ids, mask = data()
    kw = dict(progress=False, output_fisher="sequence_lowrank")
    host = lora_da.collect_statistics(CalledTwice(), batches(ids, mask, 1), ["tied"], **kw)
    dev = lora_da.collect_statistics(CalledTwice(), batches(ids, mask, 1), ["tied"], accumulate_on="device", **kw)
    a, b = (np.asarray(s.output_factors["tied"].sample_sums()) for s in (host, dev))
    assert a.shape == b.shape == (12, 8)
    assert np.abs(a - b).max() <= 1e-13 * np.abs(a).max()

# -- the memory-lean device solve ------------------------------------------------------------


def spd_problem(n: int, ms: list[int], seed: int):
    """A ``Z`` with condition 1e3 (symmetric to rounding only, as a sum of products is) and
    per module ``y > 0`` and ``Ḡ``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    Z = (Q * np.logspace(0, -3, n)) @ Q.T
    ys = [rng.random(m) + 0.1 for m in ms]
    Gs = [rng.standard_normal((m, n)) for m in ms]
    return Z, ys, Gs


@pytest.mark.parametrize("rows", [1, 3, 7, 1024])
@pytest.mark.parametrize("n,ms", [(10, [7, 13]), (23, [5, 23, 40])])
def test_a_group_solved_by_blocks_of_rows_meets_the_reference_and_equals_each_module_alone(monkeypatch, rows, n, ms):
    """``SOLVE_ROWS`` not dividing ``n`` (block edges), modules narrower and wider than ``n``:
    every module meets the SciPy reference; a group's results equal, bit for bit, each module
    solved alone (``Z_λ⁻¹`` freed before the last module's eigensolve changes nothing); the
    caller's ``Z`` is left unchanged."""
    import lora_da.plan as plan
    from helpers import check_against_reference
    from lora_da.reference import reference_solve
    from lora_da.torch_solve import solve_group_device

    monkeypatch.setattr(plan, "SOLVE_ROWS", rows)
    Z, ys, Gs = spd_problem(n, ms, seed=n)
    opts = dict(rank=3, n_pop=100.0)
    Zt = torch.from_numpy(Z.copy())
    group = solve_group_device(Zt, [torch.from_numpy(y) for y in ys], [torch.from_numpy(G) for G in Gs], **opts)
    assert np.array_equal(Zt.numpy(), Z)
    from lora_da._core import SOLVE_DEFAULTS

    full = dict(opts, **{k: SOLVE_DEFAULTS[k] for k in ("alpha", "beta", "damping", "gamma")})
    for res, y, G in zip(group, ys, Gs):
        alone = solve_group_device(torch.from_numpy(Z), [torch.from_numpy(y)], [torch.from_numpy(G)], **opts)[0]
        for f in ("A", "B", "V", "eigenvalues"):
            assert np.array_equal(getattr(res, f), getattr(alone, f)), f
        assert (res.sigma, res.c, res.next_eigenvalue) == (alone.sigma, alone.c, alone.next_eigenvalue)
        ref = reference_solve(0.5 * (Z + Z.T), y, G, **full)
        check_against_reference(res, ref, Z, full)


@pytest.mark.parametrize("rows", [1, 3, 7, 1024])
def test_the_blockwise_element_wise_passes_equal_the_plain_ones_bit_for_bit(monkeypatch, rows):
    import lora_da.plan as plan
    from lora_da import torch_solve

    monkeypatch.setattr(plan, "SOLVE_ROWS", rows)
    g = torch.Generator().manual_seed(rows)
    for n in (1, 2, 5, 17, 40):
        S = torch.randn(n, n, generator=g, dtype=torch.float64)
        plain = S.clone().add_(S.T.clone()).mul_(0.5)
        assert torch.equal(torch_solve._symmetric(S.clone()).view(torch.int64), plain.view(torch.int64))
        assert torch_solve._asymmetry(S) == float((S - S.T).abs().max())
        assert torch_solve._max_row_sum(S) == float(S.abs().sum(1).max())
        bad = S.clone()
        bad[n - 1, 0] = float("nan")  # in the last, partial block
        assert torch_solve._all_finite(S) and not torch_solve._all_finite(bad)


def test_the_top_eigenvalue_leaves_its_input_unchanged_bit_for_bit():
    """n > 512 on the CPU: the route that negates its input in place, and back (a −0.0 too)."""
    from lora_da import torch_solve

    g = torch.Generator().manual_seed(5)
    X = torch.randn(600, 30, generator=g, dtype=torch.float64)
    S = X @ X.T
    S[3, 5] = S[5, 3] = -0.0
    before = S.clone()
    top = torch_solve._top_eigenvalue(S)
    assert torch.equal(S.view(torch.int64), before.view(torch.int64))
    assert abs(top - float(torch.linalg.eigvalsh(before)[-1])) <= 1e-9 * top


def test_an_output_changed_in_place_after_the_graph_starts_there():
    """A target followed by ``nn.ReLU(inplace=True)``: in a pass whose graph starts at it, the
    in-place change is made on a tensor of the graph (not a leaf, which autograd refuses), and
    the statistics equal the host path's."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.emb = torch.nn.Embedding(50, 12)
            self.fc1 = torch.nn.Linear(12, 16)
            self.act = torch.nn.ReLU(inplace=True)
            self.fc2 = torch.nn.Linear(16, 50)

        def forward(self, input_ids, attention_mask=None):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.fc2(self.act(self.fc1(self.emb(input_ids)))))

    ids, mask = data()
    model = Net().double()
    kw = dict(progress=False)
    host = lora_da.collect_statistics(model, batches(ids, mask, 3), ["fc1", "fc2"], **kw)
    dev = lora_da.collect_statistics(model, batches(ids, mask, 3), ["fc1", "fc2"], accumulate_on="device",
                                     max_device_bytes=9000, **kw)
    assert len(dev.plan.passes) == 2  # fc1 alone in the first pass: its graph starts at its output
    assert_near_host(host, dev, 1e-13, names=("fc1", "fc2"))
