"""Small nets trained here on scikit-learn's digits: real labelled data that ships offline.

Four architecture families that stress different pruning couplings: residual adds (ResNet), depthwise
convs inside inverted residuals (MobileNetV2), attention heads and a shared residual stream (ViT), plain
Linear chains (MLP). Training is seeded and CPU-only and takes seconds; weights and exports are cached
under benchmarks/.cache/accuracy/ so the benchmark and the tests reuse one trained copy.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import ModelProto

from benchmarks.accuracy.common import (
    CACHE,
    UNLABELLED_INPUTS,
    Task,
    TorchNet,
    atomic_write,
    cached_npz,
    cached_onnx,
    export_onnx,
    fingerprint,
    run_onnx,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

ARCH_VERSION = "2"  # bump when an architecture, the data pipeline or the training recipe changes
SIDE = 8  # digits are 8x8 grayscale; used as they are
BATCH = 128
INPUT = "input"
SEED = 0
CALIBRATION_IMAGES = UNLABELLED_INPUTS


@dataclass(frozen=True)
class Split:
    """Fixed 70/30 stratified split; images (N, 1, 8, 8) float32 in [-1, 1], labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.cache
def digits() -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images[:, None].astype(np.float32) / 8.0 - 1.0).astype(np.float32)  # pixel values are 0..16
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=SEED)
    return Split(x_tr, y_tr, x_te, y_te)


def evaluate(model: ModelProto | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier (logits output) run by onnxruntime."""
    logits = run_onnx(model, {INPUT: x})
    return float((logits.argmax(axis=1) == y).mean())


# --------------------------------------------------------------------------- architectures


def _modules() -> dict[str, Callable[[], nn.Module]]:
    """Architecture constructors; defined inside a function so importing this module needs no torch."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3))
            self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                             else nn.Sequential(*conv_bn(cin, cout, 1, stride)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*conv_bn(1, 16, 3), nn.ReLU(), BasicBlock(16, 16, 1),
                                          BasicBlock(16, 32, 2), BasicBlock(32, 32, 1), BasicBlock(32, 64, 2))
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            hidden = cin * expand
            self.body = nn.Sequential(*conv_bn(cin, hidden, 1), nn.ReLU6(),
                                      *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
                                      *conv_bn(hidden, cout, 1))
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                *conv_bn(1, 16, 3), nn.ReLU6(),
                InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                InvertedResidual(24, 32, 2), InvertedResidual(32, 32, 1),
                *conv_bn(32, 128, 1), nn.ReLU6())
            self.head = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    class Attention(nn.Module):
        """Head count is fixed, head width is read from the tensor: the same code runs after pruning."""

        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, mlp: int) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = Attention(dim, heads)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self, dim: int = 48, patch: int = 2, depth: int = 2, heads: int = 4) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, (SIDE // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block(dim, heads, 2 * dim) for _ in range(depth)))
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 256), nn.ReLU(),
                                          nn.Linear(256, 128), nn.ReLU())
            self.head = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return {"resnet": ResNet, "mobilenetv2": MobileNetV2, "vit": ViT, "mlp": MLP}


@dataclass(frozen=True)
class Recipe:
    """How one net is trained: AdamW with a one-cycle schedule, batch 128, one CPU thread."""

    arch: str
    epochs: int
    lr: float
    weight_decay: float = 1e-4

    def key(self) -> str:
        return f"digits-{self.arch}-{fingerprint(ARCH_VERSION, SIDE, BATCH, SEED, self)}"


RECIPES = {r.arch: r for r in (
    Recipe("resnet", epochs=20, lr=3e-3),
    Recipe("mobilenetv2", epochs=20, lr=3e-3),
    Recipe("vit", epochs=60, lr=3e-3, weight_decay=0.05),
    Recipe("mlp", epochs=40, lr=1e-3),
)}


def _train(recipe: Recipe) -> nn.Module:
    """One thread: these nets are too small to gain from more, and on a shared machine extra threads
    oversubscribe the cores and make training ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        model = _modules()[recipe.arch]()
        split = digits()
        x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        steps = recipe.epochs * -(-len(x) // BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=steps)
        gen = torch.Generator().manual_seed(SEED)
        model.train()
        for _ in range(recipe.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(BATCH):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def trained(arch: str) -> nn.Module:
    """The trained net (eval mode), from the cache or trained now (seconds) and cached."""
    import torch

    recipe = RECIPES[arch]
    path = CACHE / f"{recipe.key()}.pt"
    model = _modules()[arch]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    model = _train(recipe)
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    print(f"  trained digits-{arch} in {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def example_input() -> dict[str, torch.Tensor]:
    import torch

    return {INPUT: torch.zeros(1, 1, SIDE, SIDE)}


def onnx_path(arch: str) -> Path:
    return cached_onnx(CACHE / f"{RECIPES[arch].key()}.onnx", lambda: export_onnx(trained(arch), example_input()))


def calibration_path() -> Path:
    """A few hundred training images (never test images) under the ONNX input name."""
    path = CACHE / f"digits-calibration-{fingerprint(ARCH_VERSION, SIDE, SEED, CALIBRATION_IMAGES)}.npz"
    split = digits()
    pick = np.random.default_rng(SEED).permutation(len(split.x_train))[:CALIBRATION_IMAGES]
    return cached_npz(path, lambda: {INPUT: split.x_train[pick]})


def torch_net(arch: str) -> TorchNet:
    """A fresh copy of the trained net for Torch-Pruning; the classifier keeps its 10 outputs."""
    model: Any = trained(arch)
    heads = {blk.attn.qkv: blk.attn.heads for blk in model.blocks} if arch == "vit" else {}
    return TorchNet(model, example_input(), [model.head], heads)


def task(arch: str) -> Task:
    split = digits()
    return Task(
        name=f"digits-{arch}",
        onnx_path=onnx_path(arch),
        score=lambda m: {"accuracy": evaluate(m, split.x_test, split.y_test)},
        calibration=calibration_path(),
        torch_net=lambda: torch_net(arch),
        unlabelled=calibration_path(),  # the 256 training images, their labels never used
    )


ARCHS: tuple[str, ...] = tuple(RECIPES)
