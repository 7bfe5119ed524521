"""Keeping a large model's statistics on one GPU (SPEC §6, §7), one run:

    python benches/bench_keep.py --shape llama7b --targets q_proj,k_proj,v_proj,o_proj --dir /tmp

1. the disk's write speed (a few GiB written and fsynced in the target folder);
2. ``collect_and_solve`` on the chosen modules (keeps nothing): the time to beat;
3. ``collect_statistics(out=FILE)`` (each pass's sums written as the pass ends) then
   ``compute_init(stats, device="cuda")`` on the memory-mapped result;
4. the subspaces of both routes on a few modules (same data, same batches).

Host memory is sampled every 20 ms: the anonymous resident memory (what the
out-of-memory killer counts; a memory-mapped file's pages are not in it) and
the whole resident set. Prints a Markdown table last; logs go to ``$OUT``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_e2e import SHAPES, batched, floor_pass, make_data, make_model  # noqa: E402


class HostMemory:
    """Peak anonymous and total resident memory of this process during a block."""

    def __enter__(self):
        self.anon = self.rss = 0
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()
        return self

    def run(self):
        while not self.stop:
            anon, rss = self.read()
            self.anon, self.rss = max(self.anon, anon), max(self.rss, rss)
            time.sleep(0.02)

    @staticmethod
    def read() -> tuple[int, int]:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields.get("RssAnon", 0), fields.get("VmRSS", 0)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()


class Timed:
    """Seconds spent in some library functions (summed over threads, calls counted), by
    wrapping them for the duration of a block: where the keep route's time goes."""

    TARGETS = [
        ("lora_da.collect.passes", "probe"),
        ("lora_da.collect.passes", "plan_device"),
        ("lora_da.collect.passes", "batch_steps"),
        ("lora_da.collect.device_sums", "DeviceSums.write"),
        ("lora_da.statistics_file", "StatisticsWriter.write_at"),
        ("lora_da.collect.device_sums", "DiskStaging.put"),
        ("lora_da.collect.device_sums", "DiskStaging.wait"),
        ("lora_da.statistics_file", "StatisticsWriter.finish"),
        ("lora_da.statistics_file", "Mapped.checked"),
        ("lora_da.statistics_file", "Mapped.read_into"),
        ("lora_da.statistics_file", "LazyInputFactors.mean_into"),
        ("lora_da.init", "_input_mean_on"),
        ("lora_da.init", "_grad_sums_on"),
        ("lora_da.init", "solve_on_device_or_host"),
        ("lora_da.pipeline", "solve_on_device_or_host"),
        ("lora_da.pipeline", "check_zero_statistics"),
        ("lora_da.pipeline", "check_zero_gradients"),
        ("lora_da.statistics", "Statistics.load"),
    ]

    def __enter__(self):
        import importlib

        self.seconds, self.calls, self.saved = {}, {}, []
        lock = threading.Lock()
        for mod_name, attr in self.TARGETS:
            mod = importlib.import_module(mod_name)
            owner, name = (getattr(mod, attr.split(".")[0]), attr.split(".")[1]) if "." in attr else (mod, attr)
            if not hasattr(owner, name):
                continue
            real = getattr(owner, name)
            key = f"{mod_name.split('.')[-1]}.{attr}"

            def wrapped(*a, _real=real, _key=key, **k):
                t = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    with lock:
                        self.seconds[_key] = self.seconds.get(_key, 0.0) + time.perf_counter() - t
                        self.calls[_key] = self.calls.get(_key, 0) + 1

            if isinstance(owner, type) and isinstance(owner.__dict__.get(name), (staticmethod, classmethod)):
                continue
            self.saved.append((owner, name, real))
            setattr(owner, name, wrapped)
        return self

    def __exit__(self, *exc):
        for owner, name, real in reversed(self.saved):
            setattr(owner, name, real)

    def table(self) -> str:
        return "\n".join(f"  {k}: {v:.2f} s in {self.calls[k]} call(s)"
                         for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1]))


def disk_speed(folder: str, gib: int = 4) -> float:
    """Bytes per second of a sequential write of ``gib`` GiB, fsynced, then removed."""
    path = os.path.join(folder, ".bench_keep_disk_probe")
    block = os.urandom(64 << 20)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(gib * 16):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    os.unlink(path)
    return gib * 2**30 / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="projection names (comma-separated)")
    ap.add_argument("--layers", type=int, default=None, help="only the first L layers")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--dir", default="/tmp", help="folder of the statistics file")
    args = ap.parse_args()

    import lora_da
    from lora_da.pipeline import collect_and_solve
    from lora_da.reference import subspace_sin_theta

    out_dir = os.environ.get("OUT", ".")
    log = open(os.path.join(out_dir, f"keep_{args.shape}.log"), "a")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    shape = SHAPES[args.shape]
    bs = args.batch or shape["batch"]
    say("command: python " + " ".join(sys.argv))
    say(f"machine: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; host threads {lora_da.num_threads()}")
    model = make_model(shape)
    ids, mask = make_data(shape["samples"])
    batches = batched(ids, mask, bs)
    kinds = args.targets.split(",")
    layers = range(args.layers if args.layers else shape["layers"])
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in kinds
             and n.startswith("model.layers.") and int(n.split(".")[2]) in layers]
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    floor_pass(model, batches[:1])  # warm-up

    speed = disk_speed(args.dir)
    say(f"disk: {speed / 2**30:.2f} GiB/s sequential write with fsync in {args.dir}")

    rows = []
    torch.cuda.synchronize()
    with HostMemory() as hm:
        t = time.perf_counter()
        inits = collect_and_solve(model, batches, names, cfg, progress=False)
        torch.cuda.synchronize()
        t_cas = time.perf_counter() - t
    plan = inits.report.plan
    say(f"collect_and_solve: {t_cas:.1f} s, host anon {hm.anon / 2**30:.1f} GiB\n{plan.describe()}")
    rows.append(("collect_and_solve", t_cas, "", hm.anon, hm.rss))

    path = os.path.join(args.dir, "bench_keep.safetensors")
    if os.path.exists(path):
        os.unlink(path)
    with HostMemory() as hm, Timed() as timed:
        t = time.perf_counter()
        stats = lora_da.collect_statistics(model, batches, names, progress=False, out=path)
        t_collect = time.perf_counter() - t
        say(f"collect_statistics(out=) {t_collect:.1f} s, in functions (summed over threads):\n{timed.table()}")
        timed.seconds, timed.calls = {}, {}
        solved = lora_da.compute_init(stats, cfg, progress=False, device="cuda")
        torch.cuda.synchronize()
        t_keep = time.perf_counter() - t
        say(f"compute_init {t_keep - t_collect:.1f} s, in functions (summed over threads):\n{timed.table()}")
    size = os.path.getsize(path)
    say(f"keep: {t_keep:.1f} s (collect_statistics {t_collect:.1f} s, compute_init {t_keep - t_collect:.1f} s), "
        f"file {size / 2**30:.2f} GiB, host anon {hm.anon / 2**30:.1f} GiB, rss {hm.rss / 2**30:.1f} GiB\n"
        f"{stats.plan.describe()}")
    rows.append(("collect_statistics(out=) + compute_init(device='cuda')", t_keep,
                 f"collect {t_collect:.1f} s, solve {t_keep - t_collect:.1f} s", hm.anon, hm.rss))
    check = names[:: max(1, len(names) // 4)][:4]
    worst = max(subspace_sin_theta(inits[n].result.V, solved[n].result.V) for n in check)
    write_s = size / speed
    budget = 1.5 * t_cas + write_s
    del stats, solved
    os.unlink(path)

    print(f"\nmodel: {args.shape} shape; {len(names)} modules ({args.targets}, {len(layers)} layers); "
          f"{shape['samples']} samples × 512 tokens, batch {bs}")
    print("| route | wall (s) | split | host anon peak (GiB) | host RSS peak (GiB) |")
    print("|---|---:|---|---:|---:|")
    for name, t, split, anon, rss in rows:
        print(f"| {name} | {t:.1f} | {split} | {anon / 2**30:.1f} | {rss / 2**30:.1f} |")
    print(f"statistics file: {size / 2**30:.2f} GiB; disk {speed / 2**30:.2f} GiB/s, so writing it takes {write_s:.1f} s")
    print(f"keep / collect_and_solve: {t_keep / t_cas:.2f}×; goal 1.5 × collect_and_solve + write = {budget:.1f} s "
          f"({'met' if t_keep <= budget else 'NOT met'})")
    print(f"subspaces, keep vs collect_and_solve on {len(check)} modules: max sin θ {worst:.1e}")


if __name__ == "__main__":
    main()
