"""User-facing pruning options, validated once so every entry point (CLI, API, service) agrees."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from graphprune.errors import UsageError

Target = Literal["channels", "params", "flops", "latency"]
Criterion = Literal["l1", "l2", "random", "bn", "lamp", "obs"]
Reduction = Literal["mean", "sum", "max", "prod"]
Normalizer = Literal["mean", "max", "sum", "none"]
Compensation = Literal["obs", "none"]
HessianSource = Literal["auto", "synthetic", "calibration", "identity"]
Recovery = Literal["none", "distill"]
Streams = Literal["keep", "rotate"]

TARGETS: tuple[str, ...] = ("channels", "params", "flops", "latency")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "max", "prod")
NORMALIZERS: tuple[str, ...] = ("mean", "max", "sum", "none")
COMPENSATIONS: tuple[str, ...] = ("obs", "none")
HESSIAN_SOURCES: tuple[str, ...] = ("auto", "synthetic", "calibration", "identity")
RECOVERIES: tuple[str, ...] = ("none", "distill")
STREAMS: tuple[str, ...] = ("keep", "rotate")
# Default distillation steps by what it trains on, from the digits nets at -50% FLOPs: 256 real inputs
# reach 98.9% of dense in 1000 steps, and ViT still gains after (.944 -> .954 at 2000, level at 3000;
# MobileNetV2 level or a little lower); synthetic inputs teach less per step (1000 steps: 94.7% of dense,
# 3000: 96.1%), so the data-free default runs longer (benchmarks/accuracy/RESULTS.md).
RECOVER_STEPS = {"calibration": 2000, "synthetic": 3000}


@dataclass
class PruneConfig:
    """How much to remove and how to choose it.

    `sparsity` is the fraction of the `target` quantity to remove (0 <= s < 1): channels, parameters,
    MACs ("flops"), or one-thread onnxruntime latency on this machine ("latency", graphprune/latency.py).
    """

    sparsity: float = 0.3
    target: Target = "channels"
    criterion: str = "auto"  # "auto": OBS importance when compensating with OBS, else L2 (see `scoring`)
    reduction: Reduction = "mean"
    normalizer: Normalizer = "mean"
    global_ranking: bool = False
    # keep each group's width a multiple of this, or "auto": of what its layers run fastest at, measured
    # on this machine (graphprune/widths.py); None: auto toward a cost target, 1 toward channels (`multiple`)
    round_to: int | Literal["auto"] | None = None
    max_group_sparsity: float = 0.9
    min_channels: int = 1
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    validate: bool = True
    latency_runs: int = 5
    max_model_bytes: int = 4 * 1024**3
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    compensate: Compensation = "obs"
    # residual streams read through RMSNorm or pre-norm LayerNorm (decoders): "keep" their width, or "rotate" them to
    # their principal directions and remove the weakest `sparsity` of them (graphprune/streams/)
    streams: Streams = "keep"
    # cross-channel normalizations (LayerNorm over the last axis, ReduceMean over channels as in RMSNorm)
    # let channels go: approximate, reported per group, the error measured in validation; off, they keep
    # their channels exactly
    approximate_norms: bool = False
    calibration: str | None = None  # .npz of real inputs (arrays named like the model's inputs)
    samples: int = 128  # synthetic samples used to estimate each consumer's input statistics
    hessian_source: HessianSource = "auto"
    damping: float = 0.01  # fraction of the mean diagonal added to H
    # Conv consumers with more im2col columns (C_in × kernel area) than this hold H Kronecker-factored,
    # channels ⊗ kernel taps (O(C²) statistics and O(C³) solves instead of O(C²k²), O(C³k⁶)); 0: every Conv
    kron_columns: int = 1024
    # bytes the OBS statistics may hold at once (0: 40% of the memory available when they start); past
    # it they are computed in several onnxruntime passes, to the same result
    obs_memory: int = 0
    # Recovery (graphprune[recover], torch): distil the pruned model from the dense one after one-shot
    # pruning, on the calibration inputs when given, else on synthetic ones; "none" keeps one-shot
    recover: Recovery = "none"
    recover_steps: int | None = None  # None: RECOVER_STEPS for the inputs it trains on
    recover_lr: float = 3e-3  # Adam's step size, cosine-decayed to 0 (divided by 3 where it diverges)
    recover_batch: int = 64
    recover_time: float = 0.0  # seconds of training at most; 0: no limit
    recover_temperature: float = 4.0  # softmax temperature of the class-score distillation loss
    # fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it
    # (graphprune/passes/fold.py): the same outputs, one node and its parameters less per BN
    fold_bn: bool = True
    # rewrite decomposed HardSwish, x * clip(x + 3, 0, 6) / 6, as one op (graphprune/passes/activations.py):
    # the same function in another order (float rounding differs), so opt-in
    fuse_activations: bool = False

    @property
    def steps_to_recover(self) -> int:
        """The recovery steps asked for, else the default for the inputs it will train on."""
        if self.recover_steps is not None:
            return self.recover_steps
        return RECOVER_STEPS["calibration" if self.calibration else "synthetic"]

    @property
    def multiple(self) -> int | Literal["auto"]:
        """The width rounding that applies. Toward MACs, parameters or latency it is "auto" unless asked
        otherwise: at round-to 1 the nine convnets of benchmarks/profile_latency.py got 0.63 of the ideal
        speed-up at -50% MACs (MobileNetV2 and EfficientNet-B0 slower than dense; the accuracy benchmark's
        digits CNNs 1.5-3.5x slower at -30/-50/-70%, benchmarks/accuracy/seeds.py), at auto 0.90; and a
        latency table of a few widths cannot predict the jumps between neighbouring odd widths. Toward
        channels S is each group's own share, which rounding would change, so it stays 1."""
        if self.round_to is not None:
            return self.round_to
        return 1 if self.target == "channels" else "auto"

    @property
    def scoring(self) -> str:
        """The criterion that runs. OBS compensation repairs best what OBS importance chose: without data,
        at -50% FLOPs, OBS importance + OBS beat magnitude pruning on all six benchmark nets, L2 + OBS on
        five (not MiniLM); PP-OCR and MiniLM gain most, the two digits CNNs lose some against L2 + OBS
        at -50/-70% (benchmarks/accuracy/RESULTS.md)."""
        if self.criterion != "auto":
            return self.criterion
        return "obs" if self.compensate == "obs" else "l2"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {self.sparsity}; e.g. --sparsity 0.3")
        if self.target not in TARGETS:
            raise UsageError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        from graphprune.importance import CRITERIA  # the registry, so plugins count too

        if self.criterion != "auto" and self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {self.criterion!r}; choose auto or one of "
                             f"{', '.join(sorted(CRITERIA))}")
        if self.reduction not in REDUCTIONS:
            raise UsageError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.normalizer not in NORMALIZERS:
            raise UsageError(f"normalizer must be one of {', '.join(NORMALIZERS)}, got {self.normalizer!r}")
        if self.round_to not in (None, "auto") and (type(self.round_to) is not int or self.round_to < 1):
            raise UsageError(f"round_to must be an integer >= 1 or 'auto', got {self.round_to!r}")
        if not 0.0 < self.max_group_sparsity <= 1.0:
            raise UsageError(f"max_group_sparsity must be in (0, 1], got {self.max_group_sparsity}")
        if self.min_channels < 1:
            raise UsageError(f"min_channels must be >= 1, got {self.min_channels}")
        if self.compensate not in COMPENSATIONS:
            raise UsageError(f"compensate must be one of {', '.join(COMPENSATIONS)}, got {self.compensate!r}")
        if self.streams not in STREAMS:
            raise UsageError(f"streams must be one of {', '.join(STREAMS)}, got {self.streams!r}")
        if self.hessian_source not in HESSIAN_SOURCES:
            raise UsageError(f"hessian_source must be one of {', '.join(HESSIAN_SOURCES)}, "
                             f"got {self.hessian_source!r}")
        if self.samples < 1:
            raise UsageError(f"samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.damping < 10.0:
            raise UsageError(f"damping must be in [0, 10), got {self.damping}")
        if self.kron_columns < 0:
            raise UsageError(f"kron_columns must be >= 0, got {self.kron_columns}")
        if self.obs_memory < 0:
            raise UsageError(f"obs_memory must be >= 0 bytes (0: 40% of the available memory), got {self.obs_memory}")
        if self.recover not in RECOVERIES:
            raise UsageError(f"recover must be one of {', '.join(RECOVERIES)}, got {self.recover!r}")
        if self.recover_steps is not None and self.recover_steps < 0:
            raise UsageError(f"recover_steps must be >= 0, got {self.recover_steps}")
        if not 0.0 < self.recover_lr < 1.0:
            raise UsageError(f"recover_lr must be in (0, 1), got {self.recover_lr}")
        if self.recover_batch < 1:
            raise UsageError(f"recover_batch must be >= 1, got {self.recover_batch}")
        if self.recover_time < 0:
            raise UsageError(f"recover_time must be >= 0 seconds (0: no limit), got {self.recover_time}")
        if self.recover_temperature <= 0:
            raise UsageError(f"recover_temperature must be > 0, got {self.recover_temperature}")
        if not isinstance(self.fold_bn, bool):  # a config file's "false" string would otherwise fold
            raise UsageError(f"fold_bn must be true or false, got {self.fold_bn!r}")
        if not isinstance(self.fuse_activations, bool):
            raise UsageError(f"fuse_activations must be true or false, got {self.fuse_activations!r}")
        if self.latency_runs < 0:
            raise UsageError(f"latency_runs must be >= 0, got {self.latency_runs}")
        if not 0 <= self.seed < 2**63:  # numpy's generators take non-negative seeds only
            raise UsageError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_model_bytes < 1:
            raise UsageError(f"max_model_bytes must be >= 1, got {self.max_model_bytes}")
        bad = {k: v for k, v in self.input_shapes.items() if not v or any(d < 1 for d in v)}
        if bad:
            raise UsageError(f"input_shapes need every dimension >= 1, got {bad}; e.g. --input-shape x=1,3,224,224")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
