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
unpickled; the header is validated before any tensor is read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lora_da._core import InputFactor, OutputFactor
from lora_da.errors import ShapeError, StatisticsFileError

FORMAT = "lora-da-statistics"
FORMAT_VERSION = 1


@dataclass
class ModuleInfo:
    """One targeted linear module, in the out × in (``m × n``) convention."""

    name: str
    in_features: int  # n
    out_features: int  # m
    kind: str  # "linear" or "conv1d" (stored transposed)
    input_group: str  # key of the shared input factor


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
        """Add another shard's statistics (e.g. another rank's) into this one."""
        if {k: asdict(v) for k, v in self.modules.items()} != {k: asdict(v) for k, v in other.modules.items()}:
            raise ShapeError("Statistics.merge: the two statistics describe different modules")
        for g, f in other.input_factors.items():
            self.input_factors[g].merge(f)
        for name, f in other.output_factors.items():
            self.output_factors[name].merge(f)
            self.grad_sums[name] += other.grad_sums[name]
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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"lora_da": json.dumps(header)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        """Read a statistics file, validating its header before any tensor."""
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
            try:
                header = json.loads(meta["lora_da"])
            except (KeyError, json.JSONDecodeError) as e:
                raise StatisticsFileError(f"{path}: no lora-da header; not a statistics file") from e
            if header.get("format") != FORMAT:
                raise StatisticsFileError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
            if header.get("format_version") != FORMAT_VERSION:
                raise StatisticsFileError(
                    f"{path}: format version {header.get('format_version')!r}; this lora-da reads version {FORMAT_VERSION}"
                )
            try:
                modules = {k: ModuleInfo(**v) for k, v in header["modules"].items()}
                groups, outputs = header["groups"], header["outputs"]
                n_samples = int(header["n_samples"])
            except (KeyError, TypeError, ValueError) as e:
                raise StatisticsFileError(f"{path}: malformed header ({e})") from e
            keys = set(f.keys())

            def shape_of(key, expected):
                if key not in keys:
                    raise StatisticsFileError(f"{path}: tensor {key!r} is missing")
                got = tuple(f.get_slice(key).get_shape())
                if got != tuple(expected):
                    raise StatisticsFileError(f"{path}: tensor {key!r} has shape {got}, header says {tuple(expected)}")

            for g, info in groups.items():
                shape_of(f"input.{g}", (info["n"] * (info["n"] + 1) // 2,))
                shape_of(f"input_comp.{g}", (info["n"] * (info["n"] + 1) // 2,))
            for name, mi in modules.items():
                if mi.input_group not in groups or groups[mi.input_group]["n"] != mi.in_features:
                    raise StatisticsFileError(f"{path}: module {name!r} refers to a missing or mismatched input group")
                shape_of(f"output.{name}", (mi.out_features,))
                shape_of(f"output_comp.{name}", (mi.out_features,))
                shape_of(f"grad.{name}", (mi.out_features, mi.in_features))
                if outputs[name]["per_sample"]:
                    shape_of(f"samples.{name}", (outputs[name]["samples"], mi.out_features))
            try:
                input_factors = {
                    g: InputFactor.from_packed(
                        info["n"],
                        f.get_tensor(f"input.{g}").astype(np.float64),
                        info["tokens"],
                        f.get_tensor(f"input_comp.{g}").astype(np.float64),
                    )
                    for g, info in groups.items()
                }
                output_factors = {}
                grad_sums = {}
                for name, mi in modules.items():
                    o = outputs[name]
                    u = f.get_tensor(f"samples.{name}").astype(np.float64) if o["per_sample"] else None
                    output_factors[name] = OutputFactor.from_parts(
                        f.get_tensor(f"output.{name}").astype(np.float64),
                        o["tokens"],
                        o["samples"],
                        u,
                        f.get_tensor(f"output_comp.{name}").astype(np.float64),
                    )
                    grad_sums[name] = f.get_tensor(f"grad.{name}").astype(np.float64)
                    if not np.all(np.isfinite(grad_sums[name])):
                        raise StatisticsFileError(f"{path}: gradient of {name!r} has non-finite values")
                new_weights = {}
                for key in header.get("new_weights", []):
                    if f"weight.{key}" not in keys:
                        raise StatisticsFileError(f"{path}: tensor 'weight.{key}' is missing")
                    new_weights[key] = f.get_tensor(f"weight.{key}")
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
            config=header.get("config", {}),
            model=header.get("model", {}),
            new_weights=new_weights,
        )
