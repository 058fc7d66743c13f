"""The three PixelDA networks.

Glossary:
    G  generator: maps a source image x_s (3 x 32 x 32, values in [-1, 1]) and a noise vector z to a
       translated image G(x_s, z) that should look like the target domain and keep the digit.
    D  discriminator: returns one logit per image, high for real target images x_t and low for
       translated ones.
    T  task classifier: returns 10 class logits; trained on x_s and G(x_s, z) with the source
       label y_s, then used on target images.

Every network returns logits; the losses apply the sigmoid or softmax themselves. Constructors take
explicit sizes, and `build_networks` maps the model config onto them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.nn as nn

IMAGE_SIZE = 32


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """G: a ResNet that turns (x_s, z) into a target-style image of the same size."""

    def __init__(self, blocks: int = 6, filters: int = 64, noise_dim: int = 100, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.noise_dim = noise_dim
        self.image_size = image_size
        # z becomes one extra input plane next to the three colour channels.
        self.noise_to_plane = nn.Linear(noise_dim, image_size * image_size)
        self.stem = nn.Sequential(
            nn.Conv2d(4, filters, 3, padding=1, bias=False),
            nn.BatchNorm2d(filters),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[ResidualBlock(filters) for _ in range(blocks)])
        self.head = nn.Conv2d(filters, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        plane = self.noise_to_plane(z).view(-1, 1, self.image_size, self.image_size)
        h = torch.cat([x, plane.to(x.dtype)], dim=1)  # B x 4 x 32 x 32
        h = self.blocks(self.stem(h))  # B x filters x 32 x 32
        # NCHW out, also when G itself runs channels_last: D's and T's noise and dropout are slower on NHWC
        return torch.tanh(self.head(h)).contiguous()  # B x 3 x 32 x 32


# CPU tensors with at least this many elements get their random numbers from several threads.
PARALLEL_RANDOM_MIN_ELEMENTS = 1 << 18
_random_pool: Optional[ThreadPoolExecutor] = None


def random_like(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Return i.i.d. standard normal ("normal") or uniform [0, 1) ("uniform") numbers shaped like x.

    PyTorch fills a CPU tensor from one generator on one core, which made D's noise and dropout a
    quarter of a CPU training step. Large CPU tensors are therefore split into one chunk per
    intra-op thread, and each chunk is filled by its own generator. The generators' seeds come from
    the global RNG, so torch.manual_seed still fixes the result. Other devices use their native kernels.
    """
    global _random_pool
    # PyTorch's CPU generator fills float32 faster than bfloat16
    dtype = torch.float32 if x.device.type == "cpu" else x.dtype
    if torch.compiler.is_compiling():
        # the compiled graph draws the numbers itself: the thread pool below would break the graph,
        # and Dynamo would then compile the rest again for every tensor shape
        if kind == "normal":
            return torch.randn(x.shape, dtype=dtype, device=x.device)
        return torch.rand(x.shape, dtype=dtype, device=x.device)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or threads < 2 or x.numel() < PARALLEL_RANDOM_MIN_ELEMENTS:
        return out.normal_() if kind == "normal" else out.uniform_()
    if _random_pool is None or _random_pool._max_workers != threads:
        _random_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pixelda-random")
    seeds = torch.randint(0, 2**62, (threads,)).tolist()
    chunks = out.view(-1).chunk(threads)

    def fill(chunk: torch.Tensor, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        chunk.normal_(generator=generator) if kind == "normal" else chunk.uniform_(generator=generator)

    for future in [_random_pool.submit(fill, chunk, seed) for chunk, seed in zip(chunks, seeds)]:
        future.result()
    return out


class GaussianNoise(nn.Module):
    """Add N(0, std^2) noise in training mode; the identity in eval mode."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + (random_like(x, "normal") * self.std).to(x.dtype)
        return x


class Dropout(nn.Dropout):
    """nn.Dropout whose mask comes from `random_like`, so large CPU masks are drawn in parallel.

    Each element is kept with probability 1 - p and scaled by 1 / (1 - p), as nn.Dropout does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        scale = (random_like(x, "uniform") >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))  # 0 or 1 / (1 - p)
        return x * scale


class Discriminator(nn.Module):
    """D: a conv net from 32 x 32 down to 4 x 4, then one logit."""

    def __init__(self, filters: int = 64, noise_std: float = 0.2, dropout: float = 0.1,
                 batchnorm: bool = False, image_size: int = IMAGE_SIZE):
        super().__init__()

        def stage(c_in: int, c_out: int, kernel: int, stride: int, norm: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride=stride)]
            if norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [GaussianNoise(noise_std), nn.LeakyReLU(0.2, inplace=True), Dropout(dropout)]
            return layers

        layers = stage(3, filters, 1, 1, False)  # B x f x 32 x 32
        channels = filters
        for _ in range(3):  # 16 x 16, 8 x 8, 4 x 4
            layers += stage(channels, channels * 2, 2, 2, batchnorm)
            channels *= 2
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Linear(channels * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)  # B x 8f*4*4
        return self.classifier(h).squeeze(1)  # B


class MaxPool2x2(nn.MaxPool2d):
    """2x2 max pooling with stride 2.

    Without autograd (evaluation) it takes the maximum of four strided views, one per position in
    the window. That gives max_pool2d's values without the argmax indices, which only backward needs.
    """

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # max_pool2d drops an odd last row or column
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # B x C x H/2 x W
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])  # B x C x H/2 x W/2


class Classifier(nn.Module):
    """T: two 5x5 conv layers with max pooling, then three fully connected layers.

    With private_first_layer, source images go through their own first convolution and translated
    or target images through another, as in the PixelDA paper. Every later layer is shared.
    batchnorm adds BatchNorm after each convolution and hidden layer.
    """

    def __init__(self, conv1: int = 32, conv2: int = 48, hidden: int = 100, dropout: float = 0.5,
                 batchnorm: bool = False, private_first_layer: bool = False,
                 num_classes: int = 10, image_size: int = IMAGE_SIZE):
        super().__init__()

        def norm2d(channels: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(channels)] if batchnorm else []

        def norm1d(features: int) -> list[nn.Module]:
            return [nn.BatchNorm1d(features)] if batchnorm else []

        def relu_and_pool() -> list[nn.Module]:
            # ReLU commutes with max pooling (same values and gradients), so without BatchNorm in
            # between it runs after the pool, on a quarter of the elements
            return [nn.ReLU(inplace=True), MaxPool2x2()] if batchnorm else [MaxPool2x2(), nn.ReLU(inplace=True)]

        self.first = nn.Conv2d(3, conv1, 5, padding=2)  # translated and target images
        self.first_source = nn.Conv2d(3, conv1, 5, padding=2) if private_first_layer else None
        self.features = nn.Sequential(
            *norm2d(conv1),
            *relu_and_pool(),  # 16 x 16
            nn.Conv2d(conv1, conv2, 5, padding=2),
            *norm2d(conv2),
            *relu_and_pool(),  # 8 x 8
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Linear(conv2 * side * side, hidden),
            *norm1d(hidden),
            nn.ReLU(inplace=True),
            Dropout(dropout),
            nn.Linear(hidden, hidden),
            *norm1d(hidden),
            nn.ReLU(inplace=True),
            Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    @property
    def shares_all_layers(self) -> bool:
        """Whether source and translated images may go through T in one batch with the same result."""
        has_batchnorm = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in self.modules())
        return self.first_source is None and not has_batchnorm

    def forward(self, x: torch.Tensor, source: bool = False) -> torch.Tensor:
        first = self.first_source if source and self.first_source is not None else self.first
        if first.weight.is_contiguous(memory_format=torch.channels_last):
            # an NCHW input would make the CPU convolution about 40% slower than an NHWC one
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.features(first(x))  # B x conv2 x 8 x 8
        return self.head(h.flatten(1))  # B x 10


def init_weights(module: nn.Module) -> None:
    """Draw conv and linear weights from N(0, 0.02) and zero their biases; BatchNorm keeps PyTorch's defaults."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_networks(model_cfg) -> dict[str, nn.Module]:
    """Build and initialise G, D and T from the model config."""
    g, d, t = model_cfg.generator, model_cfg.discriminator, model_cfg.classifier
    nets = {
        "G": Generator(blocks=g.blocks, filters=g.filters, noise_dim=g.noise_dim),
        "D": Discriminator(filters=d.filters, noise_std=d.noise_std, dropout=d.dropout, batchnorm=d.batchnorm),
        "T": Classifier(conv1=t.conv1, conv2=t.conv2, hidden=t.hidden, dropout=t.dropout,
                        batchnorm=t.batchnorm, private_first_layer=t.private_first_layer),
    }
    for net in nets.values():
        net.apply(init_weights)
    return nets
