"""The statistics' size per model size (README table; SPEC §6, §7), from the
planner's own byte counts (:class:`lora_da.plan.Unit`): Llama-architecture
shapes, all seven projections targeted, q/k/v sharing one input group and
gate/up another. Arithmetic only; runs anywhere.

    python benches/stats_sizes.py
"""

from lora_da.plan import Unit

# (hidden, intermediate, layers, key/value width): the published configurations
SHAPES = {
    "TinyLlama-1.1B": (2048, 5632, 22, 256),
    "Llama-2-7B": (4096, 11008, 32, 4096),
    "Llama-2-13B": (5120, 13824, 40, 5120),
    "Llama-2-70B": (8192, 28672, 80, 1024),
}


def layer_units(h: int, inter: int, kv: int) -> list[Unit]:
    return [Unit("qkv", h, (("q_proj", h), ("k_proj", kv), ("v_proj", kv))),
            Unit("o", h, (("o_proj", h),)),
            Unit("gate_up", h, (("gate_proj", inter), ("up_proj", inter))),
            Unit("down", inter, (("down_proj", h),))]


def main() -> None:
    gib = 2.0**30
    print("| model | modules | host memory (`collect_statistics`; also the `Statistics.save` file) | "
          "`collect_statistics(out=...)` file | device sums of the largest input group | its solve's work space |")
    print("|---|---|---|---|---|---|")
    for name, (h, inter, layers, kv) in SHAPES.items():
        units = layer_units(h, inter, kv)
        host = layers * sum(u.host_bytes for u in units)
        disk = layers * sum(u.file_bytes for u in units)
        unit = max(u.device_bytes for u in units)
        solve = max(u.solve_bytes for u in units)
        print(f"| {name} | {7 * layers} | {host / gib:.1f} GiB | {disk / gib:.1f} GiB | {unit / gib:.2f} GiB | "
              f"{solve / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
