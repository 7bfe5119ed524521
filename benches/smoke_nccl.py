"""One-process NCCL smoke test of lora-da's collectives (the fallback
while no 2-GPU machine is lent): the data-parallel code paths with the NCCL
backend and CUDA tensors, at world size 1 (NCCL cannot put two ranks on one GPU).

    torchrun --standalone --nproc_per_node 1 benches/smoke_nccl.py

Checks, on a small random Llama on the GPU: ``all_reduce_statistics`` is the
identity at world size 1; the planned device sums reduced in place
(``DeviceSums.reduce_across``) solve to the same adapters as without the
collective; ``compute_init(across_ranks=True)`` (owners + ``share_inits``:
a header object, then the arrays as one flat tensor through NCCL) returns every module with the same bits as
the plain call. Prints one line per check and ``ok`` last.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def main():
    cuda = torch.cuda.is_available()  # without a GPU (a dry run here): gloo on the CPU
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(0)
    import lora_da
    from lora_da.distributed import all_reduce_statistics, share_inits
    from lora_da.pipeline import collect_and_solve
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float64).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 500, (4, 64), generator=g), "attention_mask": torch.ones(4, 64, dtype=torch.long)}
               for _ in range(4)]
    targets = ["q_proj", "down_proj"]
    config = lora_da.LoraDAConfig(n_pop=1000, rank=4)

    stats = lora_da.collect_statistics(model, batches, targets, progress=False)
    reduced = all_reduce_statistics(stats)
    for n in stats.modules:
        assert np.array_equal(reduced.mean_grad(n), stats.mean_grad(n)), n
        assert np.array_equal(reduced.input_factor(n), stats.input_factor(n)), n
    print(f"backend {dist.get_backend()}, device {dev}")
    print(f"all_reduce_statistics over {dist.get_backend()}: {len(stats.modules)} modules, identity at world size 1")

    plain = lora_da.compute_init(stats, config, progress=False, device=dev if cuda else None)
    # across_ranks engages from two ranks on; its gathering step is called directly here
    shared = share_inits(plain, dist.group.WORLD)
    for n, init in plain.items():
        assert np.array_equal(shared[n].A, init.A) and np.array_equal(shared[n].B, init.B), n
    print(f"share_inits over {dist.get_backend()}: {len(shared)} modules, the same bits")

    from lora_da.collect.passes import collect_on_device
    from lora_da.collect.run import Run

    # the planned device path with an explicit NCCL reduction of each pass's sums
    run = Run.start(model, batches, targets, loss_fn=None, token_mask="attention", output_fisher="diagonal",
                    max_samples=None, checkpoint_path=None, checkpoint_every=None, resume=False, progress=False)
    seen = {}

    def on_pass(sums, n_samples):
        total = sums.reduce_across(dist.group.WORLD, n_samples, {u.group: 0 for u in sums.units})
        assert total == n_samples
        for u in sums.units:
            Z, per_module = sums.unit_statistics(u, total)
            for name, y, G, _ in per_module:
                seen[name] = G.cpu().numpy()

    collect_on_device(run, max_device_bytes=None, max_host_bytes=None, keep_on_host=False, on_pass=on_pass,
                      group=dist.group.WORLD)
    assert seen, "no pass was solved"
    for n, G in seen.items():
        np.testing.assert_allclose(G, stats.mean_grad(n), rtol=0, atol=1e-9 * np.abs(G).max())
    print(f"DeviceSums.reduce_across over {dist.get_backend()}: {len(seen)} modules agree with collect_statistics")
    inits = collect_and_solve(model, batches, targets, config, progress=False)
    print(f"collect_and_solve under a {dist.get_backend()} group of 1: {len(inits)} modules")
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
