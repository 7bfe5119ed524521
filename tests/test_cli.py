"""The ``lora-da`` command line on a tiny random Llama (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lora_da
from lora_da.cli import main

def _fresh_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)


def _lora_weights(peft_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in peft_model.get_base_model().named_modules():
        if isinstance(m, LoraLayer):
            out[name] = (m.lora_A["default"].weight.detach().numpy(), m.lora_B["default"].weight.detach().numpy())
    return out


def _collect(model_dir, data_file, stats, *extra):
    return main(["collect", str(model_dir), str(data_file), "--out", str(stats), "--batch-size", "3", "-q", *extra])


def test_collect_solve_load(model_dir, data_file, tmp_path, capsys):
    from peft import PeftModel

    stats = tmp_path / "stats.safetensors"
    assert _collect(model_dir, data_file, stats, "--targets", "q_proj,v_proj") == 0
    assert stats.is_file()
    assert "12 samples" in capsys.readouterr().out

    out = tmp_path / "adapter"
    args = ["solve", str(stats), "--n-pop", "1000", "--out", str(out), "--rank", "4", "--gamma", "16", "-q"]
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(model_dir)
    report = json.loads((out / "lora_da_report.json").read_text())
    assert len(report["modules"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    model = PeftModel.from_pretrained(_fresh_base(model_dir), str(out))
    got = _lora_weights(model)
    st = lora_da.Statistics.load(stats)
    want = lora_da.compute_init(st, lora_da.LoraDAConfig(n_pop=1000, rank=4, gamma=16.0), progress=False)
    assert set(got) == set(want) and len(want) == 4
    for name, init in want.items():
        np.testing.assert_allclose(got[name][0], init.A.astype(np.float32), rtol=0, atol=0)
        np.testing.assert_allclose(got[name][1], init.B.astype(np.float32), rtol=0, atol=0)

    # a second solve into the same place is refused unless --overwrite
    assert main(args) != 0
    assert "lora-da: error" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0

    # state-dict format
    sd_path = tmp_path / "init.safetensors"
    assert main(["solve", str(stats), "--n-pop", "1000", "--out", str(sd_path), "--rank", "4", "--gamma", "16",
                 "--format", "state-dict", "-q"]) == 0
    from safetensors.torch import load_file

    sd = load_file(str(sd_path))
    for name, init in want.items():
        np.testing.assert_array_equal(sd[f"{name}.lora_A.weight"].numpy(), init.A.astype(np.float32))
        np.testing.assert_array_equal(sd[f"{name}.lora_B.weight"].numpy(), init.B.astype(np.float32))

    # report from the output directory, and from the statistics (solving), with a plot
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "residual" in text
    png = tmp_path / "spectra.png"
    assert main(["report", str(stats), "--n-pop", "1000", "--rank", "4", "--plot", str(png), "-q"]) == 0
    assert "model.layers.1.self_attn.v_proj" in capsys.readouterr().out
    assert png.is_file() and png.stat().st_size > 0


def test_init_end_to_end(model_dir, data_file, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    stats = tmp_path / "s.safetensors"
    rc = main(["init", str(model_dir), str(data_file), "--n-pop", "500", "--out", str(out), "--rank", "2",
               "--targets", "all-linear", "--save-stats", str(stats), "--rslora", "--lora-alpha", "8", "-q"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["lora_alpha"] == 8
    assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(cfg["target_modules"]) == 14
    model = PeftModel.from_pretrained(_fresh_base(model_dir), str(out))
    got = _lora_weights(model)
    want = lora_da.compute_init(lora_da.Statistics.load(stats), lora_da.LoraDAConfig(n_pop=500, rank=2), progress=False)
    assert set(got) == set(want) and len(want) == 14
    for name, init in want.items():
        np.testing.assert_array_equal(got[name][0], init.A.astype(np.float32))
        np.testing.assert_array_equal(got[name][1], init.B.astype(np.float32))


def test_solve_on_a_torch_device_matches_the_host(model_dir, data_file, tmp_path):
    """``--solve-device cpu`` runs the float64 torch route (the GPU's) on the CPU: the same adapter to 1e-8."""
    from peft import PeftModel

    stats = tmp_path / "s.safetensors"
    assert main(["collect", str(model_dir), str(data_file), "--out", str(stats), "--targets", "q_proj,v_proj", "-q"]) == 0
    outs = {}
    for where in ("host", "cpu"):
        outs[where] = tmp_path / where
        assert main(["solve", str(stats), "--n-pop", "1000", "--rank", "4", "--out", str(outs[where]),
                     "--solve-device", where, "-q"]) == 0
    a, b = (_lora_weights(PeftModel.from_pretrained(_fresh_base(model_dir), str(outs[w]))) for w in ("host", "cpu"))
    assert set(a) == set(b)
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.abs(x - y).max() <= 1e-6 * np.abs(x).max()  # float32 adapters
    assert main(["solve", str(stats), "--n-pop", "1000", "--out", str(tmp_path / "x"), "--solve-device", "gpu7"]) != 0


@pytest.mark.parametrize(
    "case",
    ["missing-data", "n-pop-zero", "targets-nomatch", "missing-model", "rank-too-big", "missing-stats"],
)
def test_bad_arguments(case, model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["init", str(model_dir), str(data_file), "--n-pop", "100", "--out", str(out), "-q"]
    if case == "missing-data":
        argv = ["init", str(model_dir), str(tmp_path / "nope.jsonl"), "--n-pop", "100", "--out", str(out)]
    elif case == "n-pop-zero":
        argv = base[:3] + ["--n-pop", "0"] + base[5:]
    elif case == "targets-nomatch":
        argv = base + ["--targets", "nomatch"]
    elif case == "missing-model":
        argv = ["init", str(tmp_path / "no-model"), str(data_file), "--n-pop", "100", "--out", str(out)]
    elif case == "rank-too-big":
        argv = base + ["--rank", "64", "--targets", "q_proj"]
    else:
        argv = ["solve", str(tmp_path / "none.safetensors"), "--n-pop", "10", "--out", str(out)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "lora-da: error" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_collect_bad_targets_leaves_nothing(model_dir, data_file, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    assert _collect(model_dir, data_file, stats, "--targets", "nomatch") != 0
    assert "lora-da: error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_txt_data_and_state_dict_init(model_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("the cat sat\n\nthe dog ran fast\na big red mat\n")
    out = tmp_path / "sd.safetensors"
    rc = main(["init", str(model_dir), str(data), "--n-pop", "3", "--out", str(out), "--format", "state-dict",
               "--targets", "q_proj", "--rank", "2", "-q"])
    assert rc == 0 and out.is_file()
    assert (tmp_path / "sd.lora_da_report.json").is_file()


def test_help_parses(capsys):
    assert main(["demo", "--help"]) == 0
    assert "--gamma" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main([]) != 0
    assert main(["demo", "--steps", "0"]) != 0
    assert "lora-da: error" in capsys.readouterr().err
