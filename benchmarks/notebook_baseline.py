"""The straightforward PixelDA loop, written the way the reference notebook wrote it.

This is the baseline that benchmarks/run.py measures pixelda against, so it deliberately keeps the
notebook's habits: images preprocessed one at a time with PIL into float tensors, a DataLoader with
shuffle over TensorDatasets, fp32 eager execution, a sigmoid at the end of D with nn.BCELoss, two
separate T passes, and a G update whose backward pass also fills D's and T's gradients.

The networks are written independently of pixelda.model but list their parameters in the same
order, so `copy_weights` can start both implementations from identical weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset


class NotebookResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return x + out


class NotebookGenerator(nn.Module):
    def __init__(self, blocks: int = 6, filters: int = 64, noise_dim: int = 100):
        super().__init__()
        self.fc = nn.Linear(noise_dim, 32 * 32)
        self.conv_in = nn.Conv2d(4, filters, 3, 1, 1, bias=False)
        self.bn_in = nn.BatchNorm2d(filters)
        self.res = nn.Sequential(*[NotebookResBlock(filters) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(filters, 3, 3, 1, 1)

    def forward(self, img, z):
        noise_plane = self.fc(z).view(-1, 1, 32, 32)
        x = torch.cat((img, noise_plane), 1)
        x = torch.relu(self.bn_in(self.conv_in(x)))
        x = self.res(x)
        return torch.tanh(self.conv_out(x))


class NotebookDiscriminator(nn.Module):
    def __init__(self, filters: int = 64, noise_std: float = 0.2, dropout: float = 0.1):
        super().__init__()
        self.noise_std = noise_std
        self.convs = nn.ModuleList([
            nn.Conv2d(3, filters, 1, 1),
            nn.Conv2d(filters, filters * 2, 2, 2),
            nn.Conv2d(filters * 2, filters * 4, 2, 2),
            nn.Conv2d(filters * 4, filters * 8, 2, 2),
        ])
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * 8 * 4 * 4, 1)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
            x = x + torch.randn_like(x) * self.noise_std  # noise in every pass, as the notebook did
            x = self.drop(nn.functional.leaky_relu(x, 0.2))
        return torch.sigmoid(self.fc(x.view(x.size(0), -1)))


class NotebookClassifier(nn.Module):
    def __init__(self, conv1: int = 32, conv2: int = 48, hidden: int = 100, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, conv1, 5, 1, 2)
        self.conv2 = nn.Conv2d(conv1, conv2, 5, 1, 2)
        self.fc1 = nn.Linear(conv2 * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = self.drop(torch.relu(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.fc3(x)


def copy_weights(source: nn.Module, destination: nn.Module) -> None:
    """Copy parameters and buffers between two implementations that list them in the same order."""
    src = list(source.state_dict().values())
    dst = list(destination.state_dict().values())
    assert len(src) == len(dst), f"{len(src)} tensors vs {len(dst)}"
    with torch.no_grad():
        for a, b in zip(src, dst):
            assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
            b.copy_(a)


def preprocess_with_pil(images: np.ndarray) -> torch.Tensor:
    """The notebook's preprocessing: per image, grey to RGB, resize to 32 x 32, scale to [-1, 1]."""
    out = []
    for image in images:
        picture = Image.fromarray(image).convert("RGB").resize((32, 32), Image.BILINEAR)
        array = np.asarray(picture, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
    return torch.stack(out)


class NotebookLoop:
    """The notebook's training loop over zipped source and target DataLoaders."""

    def __init__(self, G, D, T, source_x, source_y, target_x, batch_size=32, alpha=0.13, beta=0.01,
                 g_loss_weight=0.011, noise_dim=100, lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-5):
        self.G, self.D, self.T = G, D, T
        self.alpha, self.beta, self.g_loss_weight, self.noise_dim = alpha, beta, g_loss_weight, noise_dim
        self.opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.opt_t = torch.optim.Adam(T.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.bce = nn.BCELoss()
        self.ce = nn.CrossEntropyLoss()
        self.source_loader = DataLoader(TensorDataset(source_x, source_y), batch_size=batch_size, shuffle=True)
        self.target_loader = DataLoader(TensorDataset(target_x), batch_size=batch_size, shuffle=True)
        self._batches = iter(())

    def next_batch(self):
        """Return the next zipped (x_s, y_s, x_t) batch, starting a new epoch when one runs out."""
        try:
            (xs, ys), (xt,) = next(self._batches)
        except StopIteration:
            self._batches = zip(self.source_loader, self.target_loader)
            (xs, ys), (xt,) = next(self._batches)
        return xs, ys, xt

    def step(self, xs, ys, xt, z=None):
        """One D, T and G update; returns (loss_d, loss_t, loss_g) as Python floats."""
        if z is None:
            z = torch.rand(xs.size(0), self.noise_dim) * 2 - 1
        real_label = torch.ones(xs.size(0), 1, dtype=xs.dtype, device=xs.device)
        fake_label = torch.zeros(xs.size(0), 1, dtype=xs.dtype, device=xs.device)
        fake = self.G(xs, z)

        # discriminator
        self.opt_d.zero_grad()
        loss_d = self.alpha * (self.bce(self.D(xt), real_label) + self.bce(self.D(fake.detach()), fake_label))
        loss_d.backward()
        self.opt_d.step()

        # classifier
        self.opt_t.zero_grad()
        loss_t = self.ce(self.T(xs), ys) + self.ce(self.T(fake.detach()), ys)
        loss_t.backward()
        self.opt_t.step()

        # generator
        self.opt_g.zero_grad()
        loss_g = self.g_loss_weight * self.bce(self.D(fake), real_label) + self.beta * self.ce(self.T(fake), ys)
        loss_g.backward()
        self.opt_g.step()
        return loss_d.item(), loss_t.item(), loss_g.item()

    def train_step(self):
        xs, ys, xt = self.next_batch()
        return self.step(xs, ys, xt)


def notebook_accuracy(T: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32,
                      device: torch.device = torch.device("cpu")) -> float:
    """The notebook-style evaluation: a DataLoader loop in eval mode under no_grad."""
    T.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(TensorDataset(images, labels), batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            correct += (T(x).argmax(1) == y).sum().item()
    T.train()
    return 100.0 * correct / len(labels)
