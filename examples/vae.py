"""A variational autoencoder on scikit-learn's 8x8 handwritten digits (shipped in its wheel: no download).

    python examples/vae.py                        # 30 epochs: 9 s on one busy CPU core
    python examples/vae.py --fast                 # 2 epochs on 512 images
    python examples/vae.py --reconstructions recon   # also save each epoch's reconstructions (torchvision)

pytorch/examples' vae/main.py on fitkit: the model returns ``(reconstruction, mu, logvar)``, the loss
(reconstruction + KL divergence, per sample) is a ``compute_loss`` override, and the data are images
without targets: ``fit(x)``. A callback saves reconstructions from ``trainer.batch`` and
``trainer.outputs``, the tensors the validation step already computed: no second forward pass, no extra
random numbers drawn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fitkit


class VAE(nn.Module):
    """pytorch/examples' VAE, sized for 8x8 images: 64 -> 128 -> (mu, logvar) of 8 -> 128 -> 64."""

    def __init__(self, pixels: int = 64, hidden: int = 128, latent: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, pixels)
        self.pixels = pixels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        if not self.training:  # evaluation: the mean, so validation losses are deterministic
            return mu
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, self.pixels))
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Reconstruction (binary cross-entropy) + KL divergence to N(0, I), per sample of the batch."""
    bce = F.binary_cross_entropy(recon, x.view(-1, recon.shape[1]), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / x.shape[0]


class VAETrainer(fitkit.Trainer):
    """The loss needs the inputs and three outputs: override ``compute_loss`` (built with ``loss=None``)."""

    def compute_loss(self, inputs: Any, targets: Any, outputs: Any, sample_weight: Any = None) -> torch.Tensor:
        recon, mu, logvar = outputs
        return vae_loss(recon, inputs, mu, logvar)  # targets is None: fit(x) batches are (x,)


class SaveReconstructions(fitkit.Callback):
    """Saves the first validation batch above its reconstruction, once per epoch, as a PNG grid.

    It keeps references to ``trainer.batch`` and ``trainer.outputs`` of the first validation batch (no
    copy, no host sync inside the batch loop) and writes the image at the epoch's end.
    """

    rank_zero_only = True  # one process writes the files

    def __init__(self, folder: str | Path, count: int = 8) -> None:
        self.folder = Path(folder)
        self.count = count
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if batch == 0:
            (images,) = self.trainer.batch  # fit(x): batches are (x,)
            self._pair = (images, self.trainer.outputs[0])

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._pair is None:
            return
        from torchvision.utils import save_image

        images, recon = self._pair
        self._pair = None
        n = min(self.count, images.shape[0])
        grid = torch.cat([images[:n].reshape(n, 1, 8, 8), recon[:n].reshape(n, 1, 8, 8)]).cpu()
        self.folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.folder / f"reconstruction_{epoch + 1:02d}.png", nrow=n)


def load_pixels() -> torch.Tensor:
    """The digits as (N, 64) pixel rows in [0, 1], in a fixed order."""
    from sklearn.datasets import load_digits

    pixels = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(1234))
    return pixels[order]


def build_trainer(lr: float = 1e-3, callbacks: list[fitkit.Callback] | None = None, **kw: Any) -> VAETrainer:
    model = VAE()
    return VAETrainer(model, torch.optim.Adam(model.parameters(), lr=lr), loss=None, callbacks=callbacks, **kw)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reconstructions", default=None, help="save reconstruction grids in this folder")
    parser.add_argument("--fast", action="store_true", help="2 epochs on 512 images: a smoke test in seconds")
    parser.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs = min(args.epochs, 2)

    fitkit.seed_everything(args.seed)
    x = load_pixels()[: 512 if args.fast else None]
    split = int(len(x) * 0.8)
    callbacks: list[fitkit.Callback] = [SaveReconstructions(args.reconstructions)] if args.reconstructions else []
    trainer = build_trainer(lr=args.lr, callbacks=callbacks, device=args.device, verbose=args.verbose)
    start = time.perf_counter()
    history = trainer.fit(x[:split], x[split:], batch_size=args.batch_size, epochs=args.epochs)  # no targets
    elapsed = time.perf_counter() - start
    final = {key: values[-1] for key, values in history.history.items()}
    print(
        f"trained {len(history.epoch)} epoch(s) in {elapsed:.1f}s on {trainer.device}; final loss "
        f"{final['loss']:.4f}, val_loss {final['val_loss']:.4f} (negative ELBO per image, nats)"
    )
    return final


if __name__ == "__main__":
    main()
