"""The statistics file (SPEC §6): its format and header, the header's
validation before any tensor is read, memory-mapped reading of its tensors,
and the writer that fills a file as a collection goes (version 2)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np

from lora_da._core import InputFactor
from lora_da.errors import ShapeError, StatisticsFileError
from lora_da.files import install, temp_file_beside

FORMAT = "lora-da-statistics"
# Version 2 (SPEC §6): the compensation tensors may be absent (all zeros), as in a
# file written pass by pass from device sums. Version 1 files are read unchanged.
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)


@dataclass
class ModuleInfo:
    """One targeted linear module, in the out × in (``m × n``) convention."""

    name: str
    in_features: int  # n
    out_features: int  # m
    kind: str  # "linear" or "conv1d" (stored transposed)
    input_group: str  # key of the shared input factor


# -- the header's schema -------------------------------------------------------------

FLOAT_DTYPES = ("F16", "F32", "F64")
_MAX_COUNT = 2**63 - 1  # the Rust core counts in u64/i64; beyond this a count is garbage anyway
_KINDS = ("linear", "conv1d")
_CONFIG_CHOICES = {
    "token_mask": ("attention", "labels"),
    "output_fisher": ("diagonal", "sequence_lowrank"),
    "task": ("causal-lm", "seq-cls"),
}


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _describe(v) -> str:
    """A JSON value as the header's author wrote it: its JSON type and (short) value."""
    if v is None:
        return "null"
    kind = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(v), "number")
    return f"{kind} {_short(v)}"


def validate_header(path, header) -> tuple[dict[str, ModuleInfo], dict, dict, int, dict, dict]:
    """Check a decoded ``lora_da`` header against the format, every type, range
    and cross-reference, so that the loader below it only meets the values it
    expects; anything else is a :class:`StatisticsFileError` naming ``path``,
    the header field and the value. Returns ``(modules, groups, outputs,
    n_samples, config, model)``."""

    def bad(msg: str) -> StatisticsFileError:
        return StatisticsFileError(f"{path}: {msg}")

    def obj(v, where: str) -> dict:
        if not isinstance(v, dict):
            raise bad(f"header field {where} must be a JSON object, got {_describe(v)}")
        return v

    def count(v, where: str, minimum: int) -> int:
        # bool is an int in Python, and NaN/1e999 arrive as floats: both are refused here
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= _MAX_COUNT:
            raise bad(f"header field {where} must be an integer ≥ {minimum}, got {_short(v)}")
        return v

    def text(v, where: str) -> str:
        if not isinstance(v, str):
            raise bad(f"header field {where} must be a string, got {_describe(v)}")
        return v

    def fields(d: dict, where: str, required: set, *, exact: bool = False) -> None:
        missing = sorted(required - d.keys())
        if missing:
            raise bad(f"header field {where} lacks {', '.join(missing)}")
        # only where the keys become keyword arguments; elsewhere a newer writer may add fields
        extra = sorted(d.keys() - required) if exact else []
        if extra:
            raise bad(f"header field {where} has unknown field(s) {', '.join(_short(k) for k in extra[:5])}")

    header = obj(header, "(the header itself)")
    if header.get("format") != FORMAT:
        raise bad(f"format {_short(header.get('format'))} is not {FORMAT!r}")
    version = header.get("format_version")
    if isinstance(version, bool) or version not in READS_VERSIONS:
        raise bad(f"format version {_short(version)}; this lora-da reads versions "
                  f"{', '.join(map(str, READS_VERSIONS))}")
    fields(header, "header", {"format", "format_version", "n_samples", "modules", "groups", "outputs"})
    n_samples = count(header["n_samples"], "n_samples", 1)

    groups = obj(header["groups"], "groups")
    for g, info in groups.items():
        info = obj(info, f"groups[{g!r}]")
        fields(info, f"groups[{g!r}]", {"n", "tokens"})
        count(info["n"], f"groups[{g!r}].n", 1)
        count(info["tokens"], f"groups[{g!r}].tokens", 0)

    raw_modules = obj(header["modules"], "modules")
    if not raw_modules:
        raise bad("the statistics describe no module (an adapter needs at least one)")
    modules: dict[str, ModuleInfo] = {}
    for name, v in raw_modules.items():
        where = f"modules[{name!r}]"
        v = obj(v, where)
        fields(v, where, {fd.name for fd in dataclass_fields(ModuleInfo)}, exact=True)
        if v["name"] != name:
            raise bad(f"{where}.name is {_short(v['name'])}, not the module's key")
        kind = text(v["kind"], f"{where}.kind")
        if kind not in _KINDS:
            raise bad(f"{where}.kind must be one of {', '.join(_KINDS)}, got {_short(kind)}")
        group = text(v["input_group"], f"{where}.input_group")
        n = count(v["in_features"], f"{where}.in_features", 1)
        m = count(v["out_features"], f"{where}.out_features", 1)
        if group not in groups:
            raise bad(f"module {name!r} refers to input group {group!r}, which the header does not list")
        if groups[group]["n"] != n:
            raise bad(f"module {name!r} has in_features {n}, its input group {group!r} has n = {groups[group]['n']}")
        modules[name] = ModuleInfo(name=name, in_features=n, out_features=m, kind=kind, input_group=group)

    # zero tokens would surface later as a division by zero that names neither the file nor the module
    for g, info in groups.items():
        if info["tokens"] == 0:
            users = [k for k, mi in modules.items() if mi.input_group == g]
            raise bad(f"input group {g!r} (module(s) {users[:3]}) counted no token; its Z = (1/T) Σ x xᵀ is undefined")

    outputs = obj(header["outputs"], "outputs")
    if outputs.keys() != modules.keys():
        diff = sorted(outputs.keys() ^ modules.keys())
        raise bad(f"header fields modules and outputs list different modules ({', '.join(_short(k) for k in diff[:3])})")
    config = obj(header.get("config", {}), "config")
    for name, o in outputs.items():
        where = f"outputs[{name!r}]"
        o = obj(o, where)
        fields(o, where, {"tokens", "samples", "per_sample"})
        if count(o["tokens"], f"{where}.tokens", 0) == 0:
            raise bad(f"module {name!r} counted no output token; its y = (1/T) Σ g ⊙ g is undefined")
        if not isinstance(o["per_sample"], bool):
            raise bad(f"header field {where}.per_sample must be true or false, got {_short(o['per_sample'])}")
        count(o["samples"], f"{where}.samples", 1 if o["per_sample"] else 0)
        if config.get("output_fisher") == "sequence_lowrank" and not o["per_sample"]:
            raise bad(f"{where}: output_fisher is sequence_lowrank but the per-sample sums were not kept")

    for key, choices in _CONFIG_CHOICES.items():
        if key in config and config[key] not in choices:
            raise bad(f"header field config.{key} must be one of {', '.join(choices)}, got {_short(config[key])}")
    if "batches_done" in config:
        count(config["batches_done"], "config.batches_done", 0)
    if "finished" in config and not isinstance(config["finished"], bool):
        raise bad(f"header field config.finished must be true or false, got {_short(config['finished'])}")
    for key in ("model_fingerprint", "data_fingerprint"):
        if key in config:
            text(config[key], f"config.{key}")
    model = obj(header.get("model", {}), "model")
    for key in ("class", "name_or_path"):
        if key in model:
            text(model[key], f"model.{key}")
    return modules, groups, outputs, n_samples, config, model


# -- memory-mapped statistics (SPEC §6: read one group at a time) -------------------------

# Bytes per read of a tensor read into a buffer (Mapped.read_into), and the threads that read
# them: a tensor of 128 MiB is four reads in flight at once.
READ_CHUNK = 32 << 20
READ_THREADS = 8
_READERS = None
_READERS_LOCK = threading.Lock()


def _readers():
    global _READERS
    with _READERS_LOCK:
        if _READERS is None:
            from concurrent.futures import ThreadPoolExecutor

            _READERS = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="lora-da-reader")
        return _READERS

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class Mapped:
    """The tensors of a safetensors file as copy-on-write memory maps: pages are
    read from disk when touched and dropped by the kernel when memory is short."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.entries = json.loads(f.read(size))
        self.base = 8 + size

    def array(self, key: str) -> np.ndarray:
        e = self.entries[key]
        start, _ = e["data_offsets"]
        return np.memmap(self.path, dtype=_NP_DTYPES[e["dtype"]], mode="c", offset=self.base + start,
                         shape=tuple(e["shape"]))

    def checked(self, key: str) -> np.ndarray:
        a = self.array(key)
        if a.dtype != np.float64:
            a = a.astype(np.float64)
        self.check_finite(key, a)
        return a

    def check_finite(self, key: str, a: np.ndarray) -> None:
        # chunked, so that the check needs no second copy of a large Ḡ
        flat = a.reshape(-1)
        for i in range(0, flat.size, 1 << 24):
            if not np.isfinite(flat[i:i + (1 << 24)]).all():
                raise StatisticsFileError(f"{self.path}: tensor {key!r} has non-finite values")

    def will_need(self, keys) -> None:
        """Ask the kernel to read these tensors' pages ahead, in the background
        (``posix_fadvise`` ``WILLNEED``; nothing where the platform has no such advice): a
        solve then finds its group's bytes in the page cache instead of waiting for the disk."""
        if not hasattr(os, "posix_fadvise"):
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for key in keys:
                start, end = self.entries[key]["data_offsets"]
                try:
                    os.posix_fadvise(fd, self.base + start, end - start, os.POSIX_FADV_WILLNEED)
                except OSError:  # advice only: the reads that follow do not depend on it
                    return
        finally:
            os.close(fd)

    def read_into(self, key: str, out: np.ndarray) -> None:
        """The tensor ``key`` into ``out`` (float64, C-contiguous, its shape), read from
        the file rather than through a map, then checked finite: into a reused buffer
        this costs no page faults, where a map faults in every page it is read through."""
        e = self.entries[key]
        start, end = e["data_offsets"]
        if e["dtype"] != "F64" or tuple(e["shape"]) != out.shape or not out.flags.c_contiguous:
            out[...] = self.checked(key)
            return
        view = memoryview(out.reshape(-1)).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            def read(a: int, b: int) -> None:
                while a < b:
                    k = os.preadv(fd, [view[a:b]], self.base + start + a)  # 0: the end of the file
                    if not k:
                        raise StatisticsFileError(f"{self.path}: tensor {key!r} ends early (the file was truncated)")
                    a += k

            # in chunks on several threads: a disk serves a deeper queue faster (on the H200
            # machine one reader got about 2 GiB/s of a file just written and no longer cached)
            chunks = [(a, min(a + READ_CHUNK, end - start)) for a in range(0, end - start, READ_CHUNK)]
            if len(chunks) == 1:
                read(*chunks[0])
            else:
                for job in [_readers().submit(read, a, b) for a, b in chunks]:
                    job.result()
        finally:
            os.close(fd)
        self.check_finite(key, out)


class LazyInputFactors(Mapping):
    """Input group → :class:`InputFactor`, built from the mapped file each time it is asked for."""

    def __init__(self, mapped: Mapped, groups: dict, keys: set):
        self.mapped, self.groups, self.keys_ = mapped, groups, keys

    def __getitem__(self, g: str) -> InputFactor:
        info = self.groups[g]
        comp = self.mapped.checked(f"input_comp.{g}") if f"input_comp.{g}" in self.keys_ else None
        return InputFactor.from_packed(info["n"], self.mapped.checked(f"input.{g}"), info["tokens"], comp)

    def mean_into(self, g: str, out: np.ndarray) -> None:
        """Group ``g``'s ``Z`` (SPEC §2) into ``out`` (``n × n`` float64) straight from the
        mapped triangle: the values of ``self[g].mean_into(out)`` without the factor's copy
        of the triangle and its zeroed compensation (most of a group's host time)."""
        info = self.groups[g]
        comp = self.mapped.checked(f"input_comp.{g}") if f"input_comp.{g}" in self.keys_ else None
        InputFactor.packed_mean_into(info["n"], np.ascontiguousarray(self.mapped.checked(f"input.{g}")),
                                     info["tokens"], out, comp)

    def compensated(self, g: str) -> bool:
        """Whether group ``g``'s triangle has a compensation (a file saved from the host's sums)."""
        return f"input_comp.{g}" in self.keys_

    def read_packed_into(self, g: str, out: np.ndarray) -> None:
        """Group ``g``'s packed triangle (``n(n+1)/2`` float64) read into ``out``, checked finite."""
        self.mapped.read_into(f"input.{g}", out)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)


class LazyGrads(Mapping):
    """Module → its ``Σ_s ∂ℓ_s/∂W`` as a memory map, checked finite the first time it is asked for."""

    def __init__(self, mapped: Mapped, modules: dict):
        self.mapped, self.modules, self.ok = mapped, modules, set()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.modules:
            raise KeyError(name)
        if name in self.ok:
            return self.mapped.array(f"grad.{name}")
        a = self.mapped.checked(f"grad.{name}")
        self.ok.add(name)
        return a

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Module ``name``'s ``Σ_s ∂ℓ_s/∂W`` read into ``out`` (``m × n`` float64), checked finite."""
        if name not in self.modules:
            raise KeyError(name)
        self.mapped.read_into(f"grad.{name}", out)
        self.ok.add(name)

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


# -- a statistics file written as it is collected (SPEC §6, §7) --------------------------------


class StatisticsWriter:
    """One statistics file (SPEC §6, version 2), written tensor by tensor as
    each input group's pass ends, so that the host never holds more than one
    group's sums: the data region is laid out when the file is opened (fixed
    shapes first, the per-sample sums last, once their count is known), the
    header is written last into space reserved for it (safetensors allows a
    header padded with spaces), and the file is renamed into place only when
    complete. The compensation tensors are left out: device sums are plain
    float64 sums."""

    def __init__(self, path, modules: dict[str, ModuleInfo], group_n: dict[str, int], per_sample: bool,
                 placeholder_header: dict):
        self.path = Path(path)
        self.modules, self.group_n, self.per_sample = modules, group_n, per_sample
        self.entries: dict[str, dict] = {}
        end = 0
        for g, n in group_n.items():
            end = self._place(f"input.{g}", [n * (n + 1) // 2], end)
        for name, mi in modules.items():
            end = self._place(f"output.{name}", [mi.out_features], end)
            end = self._place(f"grad.{name}", [mi.out_features, mi.in_features], end)
        self.fixed_end = end
        self.end = end
        # room for the final header: the placeholder's, with every count at its widest, and slack
        widest = self._header_bytes(placeholder_header, samples=10**15)
        self.reserved = -(-(len(widest) + 4096) // 8) * 8
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = temp_file_beside(self.path)
        self.fd = fd
        self.flusher = None
        try:
            os.ftruncate(fd, 8 + self.reserved + self.end)
        except BaseException:
            self.abort()
            raise
        self.flusher = _Flusher(fd)

    def _place(self, key: str, shape: list[int], start: int) -> int:
        size = 8 * int(np.prod(shape))
        self.entries[key] = {"dtype": "F64", "shape": shape, "data_offsets": [start, start + size]}
        return start + size

    @property
    def file_bytes(self) -> int:
        return 8 + self.reserved + self.end

    def set_samples(self, n_samples: int) -> None:
        """Lay out the per-sample sums (``sequence_lowrank``) once the sample count is known."""
        if not self.per_sample or any(k.startswith("samples.") for k in self.entries):
            return
        end = self.fixed_end
        for name, mi in self.modules.items():
            end = self._place(f"samples.{name}", [n_samples, mi.out_features], end)
        self.end = end
        os.ftruncate(self.fd, 8 + self.reserved + self.end)

    def _pwrite(self, data: np.ndarray, offset: int) -> None:
        view = memoryview(np.ascontiguousarray(data, dtype=np.float64)).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:  # a full disk, a quota: the same error, naming the file it was writing
            raise OSError(e.errno, f"{e.strerror or e} (writing the statistics file {self.path})", self.tmp) from e
        self.flusher.wrote(len(view))

    def write_at(self, key: str, start: int, flat: np.ndarray) -> None:
        """Elements ``start : start + flat.size`` of tensor ``key`` in its row-major order
        (a 1-D float64 ``flat``): a tensor written in blocks, as they reach the host."""
        e = self.entries[key]
        size = int(np.prod(e["shape"]))
        if flat.ndim != 1 or start < 0 or start + flat.size > size:
            raise ShapeError(f"StatisticsWriter: {key}: elements {start}:{start + flat.size} of a tensor of {size}")
        self._pwrite(flat, 8 + self.reserved + e["data_offsets"][0] + 8 * start)

    def _header_bytes(self, header: dict, samples: int | None = None) -> bytes:
        entries = dict(self.entries)
        if self.per_sample and samples is not None:
            entries = dict(entries, **{f"samples.{k}": {"dtype": "F64", "shape": [samples, mi.out_features],
                                                       "data_offsets": [10**15, 10**15]}
                                       for k, mi in self.modules.items()})
        return json.dumps({"__metadata__": {"lora_da": json.dumps(header)}, **entries}, separators=(",", ":")).encode()

    def finish(self, header: dict) -> None:
        """Write the header into its reserved space, flush, and rename the file into place."""
        try:
            raw = self._header_bytes(header)
            if len(raw) > self.reserved:
                raise StatisticsFileError(f"{self.path}: the header outgrew the space reserved for it "
                                          f"({len(raw)} > {self.reserved} bytes)")
            os.pwrite(self.fd, self.reserved.to_bytes(8, "little") + raw + b" " * (self.reserved - len(raw)), 0)
            self.flusher.stop()
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            install(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()  # before the descriptor it syncs is closed
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class _Flusher:
    """Sends a file's written pages to the disk while it is still being written (a thread
    calling ``fdatasync`` after each ``FLUSH_BYTES`` written). The kernel would start only
    once a tenth or so of the host's memory is dirty, and the final ``fsync`` would then wait
    for most of the file: the disk's time overlaps the writing instead (SPEC §6 files written
    as each pass ends)."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, 0
        self.wake, self.lock, self.done = threading.Event(), threading.Lock(), False
        self.thread = threading.Thread(target=self._run, name="lora-da-flusher", daemon=True)
        self.thread.start()

    def wrote(self, k: int) -> None:
        with self.lock:
            self.pending += k
            if self.pending >= FLUSH_BYTES:
                self.pending = 0
                self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.done:
                return
            try:
                os.fdatasync(self.fd)
            except OSError:  # the final fsync reports it again, in the writer's thread
                return

    def stop(self) -> None:
        self.done = True
        self.wake.set()
        self.thread.join()


# Bytes written between two early flushes of a statistics file (_Flusher).
FLUSH_BYTES = 1 << 30


def file_header(*, modules: dict[str, ModuleInfo], groups: dict, outputs: dict, n_samples: int, config: dict,
                model: dict, new_weights=()) -> dict:
    """The ``lora_da`` header of a statistics file (SPEC §6)."""
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "n_samples": n_samples,
        "modules": {k: asdict(v) for k, v in modules.items()},
        "groups": groups,
        "outputs": outputs,
        "config": config,
        "model": model,
    }
    if new_weights:
        header["new_weights"] = sorted(new_weights)
    return header
