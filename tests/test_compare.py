"""lora_da.compare: the arms of the quality benchmark are comparable and LoRA-DA's arm is the library's init.

Tiny random Llama built from a config, a few steps: these check properties, not quality.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_da import LoraDAConfig, initialize_lora_da_weights  # noqa: E402
from lora_da import compare  # noqa: E402


def tiny_task(n_batches=3, bs=4, length=8, vocab=24) -> compare.Task:
    from peft import LoraConfig, TaskType
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    base_model = LlamaForCausalLM(cfg).float().eval()

    def batches(seed, n):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(0, vocab, (bs, length), generator=g)
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0  # some padding, which must not count
            out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        return out

    @torch.no_grad()
    def evaluate(model, bs_):
        model.eval()
        losses = [float(model(**b).loss) for b in bs_]
        return {"loss": sum(losses) / len(losses), "metric": -sum(losses) / len(losses)}

    return compare.Task(
        "tiny", base=lambda seed: copy.deepcopy(base_model),
        lora_config=lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                       lora_dropout=0.0, task_type=TaskType.CAUSAL_LM),
        train=lambda seed: batches(100 + seed, n_batches), calib=batches(1, 2), select=batches(2, 1),
        eval=batches(3, 1), evaluate=evaluate, metric="-loss", n_pop=n_batches * bs)


# PiSSA and β = 0 add nothing these tests check beyond what PEFT default and LoRA-DA cover; they are left
# out to keep the module fast
ARMS = ("PEFT default", "gaussian", "LoRA-One*", "LoRA-DA", "LoRA-DA authors", "LoRA-DA auto-norm")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    task = tiny_task()
    methods = [m for m in compare.available_methods(lambda *_: None) if m.name in ARMS]
    methods = [compare.Method(m.name, m.init, (1.0, 16.0) if m.scales != (None,) else m.scales) for m in methods]
    res = compare.run_comparison([task], seeds=[0, 1], lrs=[1e-3], steps=2, out_dir=out, methods=methods,
                                 sensitivity=(1.0, 4.0), log=lambda *_: None)
    return task, res[0], out


def test_every_arm_runs_and_the_table_and_plot_are_written(compared):
    _, res, out = compared
    assert set(res.runs) == set(ARMS) and res.failed == {}
    for name, runs in res.runs.items():
        assert [r.seed for r in runs] == [0, 1]
        assert all(len(r.losses) == 2 and all(math.isfinite(x) for x in r.losses) for r in runs), name
    text = (out / "results.md").read_text()
    for name in ARMS:
        assert f"| {name} |" in text
    assert "γ sensitivity" in text and "auto-norm bar" in text
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_same_base_weights_and_data_order_across_arms(compared):
    _, res, _ = compared
    for seed in (0, 1):
        runs = [r for rs in res.runs.values() for r in rs if r.seed == seed]
        runs += [r for rs in res.sensitivity.values() for r in rs if r.seed == seed]
        assert len(runs) == len(ARMS) + 2
        assert len({r.base_fingerprint for r in runs}) == 1
        assert all(torch.equal(r.first_batch, runs[0].first_batch) for r in runs)
    # the seeds do differ in data order (else three seeds would be one)
    a = next(r for r in res.runs["PEFT default"] if r.seed == 0)
    b = next(r for r in res.runs["PEFT default"] if r.seed == 1)
    assert not torch.equal(a.first_batch, b.first_batch)


def test_search_grid_is_the_same_for_every_scaled_arm(compared):
    _, res, _ = compared
    grids = {name: sorted((lr, sc) for lr, sc, _ in g) for name, g in res.search.items()}
    assert grids["LoRA-DA"] == grids["LoRA-One*"] == grids["LoRA-DA authors"] == [(1e-3, 1.0), (1e-3, 16.0)]
    assert grids["PEFT default"] == [(1e-3, None)]


def test_lora_da_arm_equals_initialize_lora_da_weights():
    task = tiny_task()
    arm = compare.init_lora_da(task.base(0), task.lora_config(), task.calib, scale=16.0, task=task, seed=0).model
    ref = compare.peft_model(task.base(0), task.lora_config(), 0)
    initialize_lora_da_weights(ref, task.calib, lora_da_config=LoraDAConfig(n_pop=task.n_pop, gamma=16.0),
                               progress=False)
    got, want = arm.state_dict(), ref.state_dict()
    keys = [k for k in want if "lora_" in k]
    assert keys
    for k in keys:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)
    # and not trivially: LoRA-DA's B is not PEFT's zero B
    assert any(float(want[k].abs().max()) > 0 for k in keys if "lora_B" in k)


def test_auto_norm_sets_each_initial_update_to_rho_of_the_weight():
    task = tiny_task()
    model = compare.init_lora_da_auto(task.base(0), task.lora_config(), task.calib, task=task, seed=0).model
    from peft.tuners.lora import LoraLayer

    seen = 0
    for _, layer in model.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            upd = layer.scaling["default"] * torch.linalg.matrix_norm((B @ A).detach().double())
            w = torch.linalg.matrix_norm(layer.get_base_layer().weight.double())
            assert float(upd / w) == pytest.approx(compare.AUTO_NORM_RHO, rel=1e-4)
            seen += 1
    assert seen == 6  # 2 layers × (q, v, down)


def test_the_authors_recipe_solves_the_statistics_of_spec_2(monkeypatch):
    """The baseline is the authors' pipeline only if what it hands its float32 solve is SPEC §2's Z/T, y/T and Ḡ:
    checked against per-sample autograd in float64, to float32 rounding, one decoder layer per Fisher pass."""
    import numpy as np
    from helpers import LLAMA_TARGETS, brute_force, data, tiny_llama

    from lora_da.compare import authors

    model = tiny_llama(torch.float32)
    ids, mask = data()
    samples = [{"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]} for i in range(len(ids))]
    handed, solve = [], authors.solve_float32

    def spy(Z, y, T, G, **kw):
        handed.append(((Z / T).double().numpy(), (y / T).double().numpy(), G.double().numpy()))
        return solve(Z, y, T, G, **kw)

    monkeypatch.setattr(authors, "solve_float32", spy)
    out = authors.authors_pipeline(model, samples, LLAMA_TARGETS, n_pop=100, rank=2, layers_per_pass=1)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LLAMA_TARGETS]
    assert list(out["inits"]) == names and len(handed) == len(names) == 14
    want, _ = brute_force(tiny_llama(torch.float64), ids, mask, names)
    for n, (Z, y, G) in zip(names, handed):
        G64, Z64, y64 = want[n]
        for got, ref in ((Z, Z64), (y, y64), (G, G64)):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=n)
        A, B = out["inits"][n]
        assert A.shape == (2, Z.shape[0]) and B.shape == (y.shape[0], 2) and torch.isfinite(A).all()


def test_what_an_arm_returns_reaches_the_run_and_the_table(tmp_path):
    """The harness reads the arm's ArmSetup: the solve cost it reports is charged to the run's init time (the
    table's "init s"), the γ it chose per module is summarised in the note."""
    task = tiny_task()

    def costly(base, cfg, calib, *, task=None, seed=0):
        model = compare.init_default(base, cfg, calib, task=task, seed=seed).model
        return compare.ArmSetup(model, solve_s=250.0, gammas={"q": 64.0, "v": 1.0, "down": 4.0})

    arms = [compare.Method("PEFT default", compare.init_default), compare.Method("costly", costly)]
    res = compare.run_comparison([task], seeds=[0], lrs=[1e-3], steps=1, out_dir=tmp_path, methods=arms,
                                 sensitivity=(), log=lambda *_: None, internal_checks=False)[0]
    plain, charged = res.runs["PEFT default"][0], res.runs["costly"][0]
    assert charged.init_s >= 250.0 > plain.init_s
    assert charged.extra == "γ median 4 (range 1…64)" and plain.extra == ""
    rows = {cells[1].strip(): cells for cells in (line.split("|") for line in
                                                  (tmp_path / "results.md").read_text().splitlines())
            if len(cells) > 2 and cells[1].strip() in ("PEFT default", "costly")}
    assert float(rows["costly"][-5]) >= 250.0 > float(rows["PEFT default"][-5])  # init s
    assert rows["costly"][-2].strip() == "γ median 4 (range 1…64)" and rows["PEFT default"][-2].strip() == ""

    # LoRA-DA's arm reports the statistics and solve it computed once for the seed, to every γ that reuses them
    first = compare.init_lora_da(task.base(0), task.lora_config(), task.calib, scale=16.0, task=task, seed=0)
    again = compare.init_lora_da(task.base(0), task.lora_config(), task.calib, scale=1.0, task=task, seed=0)
    ((_, seconds, peak),) = task.solved.values()
    assert first.solve_s == again.solve_s == seconds > 0 and first.solve_peak_mb is peak is None  # a CPU: no GPU peak
