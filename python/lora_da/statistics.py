"""The statistics of one pass over the calibration set (SPEC §2), and their file.

A :class:`Statistics` holds, per target module, the float64 sum of per-sample
gradients (``Ḡ = grad_sum / N_s``), the output factor ``y`` and a reference
to an input factor ``Z`` (shared by modules fed the same input tensor). It is
what a user keeps to re-solve for other ranks or β without the model.

File format (safetensors, written atomically): tensors ``input.<group>`` (the
packed lower triangle of ``Σ x xᵀ``) and ``input_comp.<group>`` (its Neumaier
compensation, so a reload is bit-exact), ``output.<module>`` / ``output_comp.<module>``
(``Σ g ⊙ g``),
``samples.<module>`` (per-sample sums, optional), ``grad.<module>``
(``Σ_s ∂ℓ_s/∂W``, ``m × n``), ``weight.<parameter>`` (parameters the model had
freshly initialized when the statistics were taken, e.g. a classification
head: the adapter must carry them); the JSON header ``lora_da`` carries the format
version, the module table, counts and the collection config. Nothing is
unpickled; the header is validated before any tensor is read
(:mod:`lora_da.statistics_file`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lora_da._core import InputFactor, OutputFactor
from lora_da.errors import InvalidArgumentError, ShapeError, StatisticsFileError
from lora_da.files import write_atomic
from lora_da.words import count
from lora_da.statistics_file import (FLOAT_DTYPES, FORMAT, FORMAT_VERSION, READS_VERSIONS, LazyGrads, LazyInputFactors,
                                     Mapped, ModuleInfo, StatisticsWriter, file_header, validate_header)


@dataclass
class Statistics:
    modules: dict[str, ModuleInfo]
    input_factors: dict[str, InputFactor]
    output_factors: dict[str, OutputFactor]
    grad_sums: dict[str, np.ndarray]  # Σ_s ∂ℓ_s/∂W, float64, m × n
    n_samples: int
    config: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    plan: object = field(default=None, repr=False, compare=False)  # the collection's MemoryPlan, when it made one
    # Parameters that were freshly (seeded-randomly) initialized in the model the
    # statistics describe, e.g. a classification head: {"classifier.weight": array}.
    new_weights: dict[str, np.ndarray] = field(default_factory=dict)

    # -- SPEC §2 quantities -------------------------------------------------
    def __repr__(self) -> str:
        """A summary (modules, input groups, samples, tokens, float64 bytes, a few names), not every module:
        a 7B model's statistics have hundreds of modules and the dataclass repr printed each one."""
        names = list(self.modules)
        shown = ", ".join(names[:3]) + (f", … ({len(names) - 3} more)" if len(names) > 3 else "")
        tokens = sum(f.tokens for f in self.input_factors.values())
        nbytes = sum(8 * (f.n * (f.n + 1) // 2) for f in self.input_factors.values()) + sum(
            g.nbytes for g in self.grad_sums.values()) + sum(8 * f.m for f in self.output_factors.values())
        model = self.model.get("name_or_path") or self.model.get("class") or "?"
        return (f"Statistics({count(len(names), 'module')} in {count(len(self.input_factors), 'input group')}, "
                f"{count(self.n_samples, 'sample')}, {count(tokens, 'token')} over the groups, {nbytes / 2**20:.1f} MiB float64, model {model!r}; "
                f"modules: {shown})")

    def input_factor(self, name: str) -> np.ndarray:
        """``Z = (1/T) Σ_t x_t x_tᵀ`` of module ``name`` (``n × n``)."""
        return self.input_factors[self.modules[name].input_group].mean()

    def output_factor(self, name: str) -> np.ndarray:
        """``y = (1/T) Σ_t g_t ⊙ g_t`` of module ``name`` (``m``)."""
        return self.output_factors[name].mean()

    def mean_grad(self, name: str) -> np.ndarray:
        """``Ḡ = (1/N_s) Σ_s ∂ℓ_s/∂W`` of module ``name`` (``m × n``)."""
        return self.grad_sums[name] / self.n_samples

    def groups(self) -> dict[str, list[str]]:
        """Input group → the modules sharing that ``Z``, in module order."""
        out: dict[str, list[str]] = {}
        for name, info in self.modules.items():
            out.setdefault(info.input_group, []).append(name)
        return out

    def merge(self, other: Statistics) -> None:
        """Add another shard's statistics (e.g. another rank's) into this one
        (SPEC §2, data-parallel runs: sums and counts added, ``u_s`` appended).

        All or nothing: everything is checked first, and the sums are formed on
        copies and swapped in only when every one succeeded, so a refused merge
        leaves this object exactly as it was."""
        if not isinstance(other, Statistics):
            raise InvalidArgumentError(f"Statistics.merge: the other shard must be a lora_da.Statistics, got "
                                       f"{type(other).__name__}")
        if isinstance(self.input_factors, LazyInputFactors):
            raise InvalidArgumentError("Statistics.merge: these statistics are memory-mapped from their file (read-only); "
                                       "load them with Statistics.load(path, mmap=False) to merge into them")
        if {k: asdict(v) for k, v in self.modules.items()} != {k: asdict(v) for k, v in other.modules.items()}:
            raise ShapeError("Statistics.merge: the two statistics describe different modules")
        if self.input_factors.keys() != other.input_factors.keys():
            raise ShapeError("Statistics.merge: the two statistics have different input groups")
        for key in ("token_mask", "output_fisher"):
            # the same sums over other tokens, or without the u_s, are other quantities
            if self.config.get(key) != other.config.get(key):
                raise ShapeError(f"Statistics.merge: {key} {other.config.get(key)!r} cannot merge into "
                                 f"{self.config.get(key)!r}")
        for what, mine, theirs in (("output factor", self.output_factors, other.output_factors),
                                   ("gradient sum", self.grad_sums, other.grad_sums)):
            for name in sorted(set(mine) ^ set(theirs)):  # a raw KeyError in the sums otherwise
                holder = "the other shard" if name in mine else "this shard"
                raise ShapeError(f"Statistics.merge: module {name}: {holder} has no {what} for it")
        for name, g in self.grad_sums.items():
            theirs = np.shape(other.grad_sums[name])
            if theirs != np.shape(g):
                raise ShapeError(f"Statistics.merge: module {name}: the other shard's gradient sum is {theirs}, this "
                                 f"one's {np.shape(g)} (out × in)")
        for name, f in other.output_factors.items():
            if f.per_sample != self.output_factors[name].per_sample:
                raise ShapeError(f"Statistics.merge: module {name}: per-sample sums (output_fisher='sequence_lowrank') "
                                 f"kept by {'the other' if f.per_sample else 'this'} shard only")
        inputs = {g: f.copy() for g, f in self.input_factors.items()}
        outputs = {n: f.copy() for n, f in self.output_factors.items()}
        for g, f in other.input_factors.items():
            inputs[g].merge(f)
        for name, f in other.output_factors.items():
            outputs[name].merge(f)
        grads = {n: g + other.grad_sums[n] for n, g in self.grad_sums.items()}
        self.input_factors, self.output_factors, self.grad_sums = inputs, outputs, grads
        self.n_samples += other.n_samples

    # -- files ----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (a temporary file, then rename)."""
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        groups = {}
        for g, f in self.input_factors.items():
            tensors[f"input.{g}"], tensors[f"input_comp.{g}"] = f.packed_raw()
            groups[g] = {"n": f.n, "tokens": f.tokens}
        outputs = {}
        for name, f in self.output_factors.items():
            tensors[f"output.{name}"], tensors[f"output_comp.{name}"] = f.sum_raw()
            u = f.sample_sums()
            if u is not None:
                tensors[f"samples.{name}"] = np.ascontiguousarray(u)
            outputs[name] = {"tokens": f.tokens, "samples": f.samples, "per_sample": f.per_sample}
            tensors[f"grad.{name}"] = np.ascontiguousarray(self.grad_sums[name], dtype=np.float64)
        for key, w in self.new_weights.items():
            tensors[f"weight.{key}"] = np.ascontiguousarray(w)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_samples": self.n_samples,
            "modules": {k: asdict(v) for k, v in self.modules.items()},
            "groups": groups,
            "outputs": outputs,
            "config": self.config,
            "model": self.model,
        }
        if self.new_weights:
            header["new_weights"] = sorted(self.new_weights)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"lora_da": json.dumps(header)}))

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> Statistics:
        """Read a statistics file, validating its header before any tensor.

        ``mmap=True`` maps the file instead of reading it (SPEC §6): the
        header and every tensor's shape and dtype are validated now, each
        input group's factor and each ``Ḡ`` are read (and checked finite)
        when used, so a solve holds one group's statistics at a time. Such
        statistics are read-only (``merge`` refuses them)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StatisticsFileError(f"{path}: no such statistics file")
        try:
            handle = safe_open(str(path), framework="numpy")
        except Exception as e:  # safetensors raises its own error types
            raise StatisticsFileError(f"{path}: not a readable safetensors file ({e})") from e
        with handle as f:
            meta = f.metadata() or {}
            if "lora_da" not in meta:
                raise StatisticsFileError(f"{path}: no lora-da header; not a statistics file")
            try:
                header = json.loads(meta["lora_da"])
            except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer too long to parse
                raise StatisticsFileError(f"{path}: the lora-da header is not valid JSON ({type(e).__name__})") from e
            modules, groups, outputs, n_samples, config, model = validate_header(path, header)
            keys = set(f.keys())

            def shape_of(key, expected):
                if key not in keys:
                    raise StatisticsFileError(f"{path}: tensor {key!r} is missing")
                sl = f.get_slice(key)
                got = tuple(sl.get_shape())
                if got != tuple(expected):
                    raise StatisticsFileError(f"{path}: tensor {key!r} has shape {got}, header says {tuple(expected)}")
                # astype(float64) would drop a complex tensor's imaginary part without a word
                dtype = sl.get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise StatisticsFileError(
                        f"{path}: tensor {key!r} has dtype {dtype}; a statistics file holds real floats ({', '.join(FLOAT_DTYPES)})"
                    )

            version = header["format_version"]

            def optional(key, expected):  # version 2 may leave out the compensations (zeros)
                if version >= 2 and key not in keys:
                    return False
                shape_of(key, expected)
                return True

            for g, info in groups.items():
                shape_of(f"input.{g}", (info["n"] * (info["n"] + 1) // 2,))
                optional(f"input_comp.{g}", (info["n"] * (info["n"] + 1) // 2,))
            for name, mi in modules.items():
                shape_of(f"output.{name}", (mi.out_features,))
                optional(f"output_comp.{name}", (mi.out_features,))
                shape_of(f"grad.{name}", (mi.out_features, mi.in_features))
                if outputs[name]["per_sample"]:
                    shape_of(f"samples.{name}", (outputs[name]["samples"], mi.out_features))
            new_weight_names = header.get("new_weights", [])
            if not isinstance(new_weight_names, list) or not all(isinstance(k, str) for k in new_weight_names):
                raise StatisticsFileError(f"{path}: header field new_weights must be a list of parameter names")
            for key in new_weight_names:
                if f"weight.{key}" not in keys:
                    raise StatisticsFileError(f"{path}: tensor 'weight.{key}' is missing")
                shape_of(f"weight.{key}", f.get_slice(f"weight.{key}").get_shape())  # its dtype
            try:
                def tensor(key):
                    t = f.get_tensor(key).astype(np.float64)
                    if not np.all(np.isfinite(t)):
                        raise StatisticsFileError(f"{path}: tensor {key!r} has non-finite values")
                    return t

                comp = lambda key: tensor(key) if key in keys else None  # noqa: E731
                if mmap:
                    mapped = Mapped(path)
                    input_factors = LazyInputFactors(mapped, groups, keys)
                    grad_sums = LazyGrads(mapped, modules)
                else:
                    input_factors = {
                        g: InputFactor.from_packed(info["n"], tensor(f"input.{g}"), info["tokens"], comp(f"input_comp.{g}"))
                        for g, info in groups.items()
                    }
                    grad_sums = {name: tensor(f"grad.{name}") for name in modules}
                output_factors = {}
                for name, mi in modules.items():
                    o = outputs[name]
                    u = tensor(f"samples.{name}") if o["per_sample"] else None
                    output_factors[name] = OutputFactor.from_parts(
                        tensor(f"output.{name}"), o["tokens"], o["samples"], u, comp(f"output_comp.{name}")
                    )
                new_weights = {}
                for key in new_weight_names:
                    if f"weight.{key}" not in keys:
                        raise StatisticsFileError(f"{path}: tensor 'weight.{key}' is missing")
                    new_weights[key] = f.get_tensor(f"weight.{key}")
                    if not np.all(np.isfinite(new_weights[key])):
                        raise StatisticsFileError(f"{path}: tensor 'weight.{key}' has non-finite values")
            except StatisticsFileError:
                raise
            except Exception as e:
                raise StatisticsFileError(f"{path}: corrupted tensor data ({e})") from e
        return cls(
            modules=modules,
            input_factors=input_factors,
            output_factors=output_factors,
            grad_sums=grad_sums,
            n_samples=n_samples,
            config=config,
            model=model,
            new_weights=new_weights,
        )


__all__ = ["FORMAT", "FORMAT_VERSION", "READS_VERSIONS", "ModuleInfo", "Statistics", "StatisticsWriter", "file_header"]
