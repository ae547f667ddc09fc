"""A DCGAN on scikit-learn's 8x8 handwritten digits (shipped in its wheel: no download): two optimizers.

    python examples/gan.py                  # 30 epochs: 41 s on one busy CPU core
    python examples/gan.py --fast           # 2 epochs on 256 images, a few seconds
    python examples/gan.py --samples samples.png   # also save a grid of generated digits (torchvision)

The training step is pytorch/examples' dcgan/main.py step, written with fitkit's handles:
``self.backward(loss, optimizer="discriminator")`` puts gradients only into the discriminator's parameters
(the generator's loss never leaks into the discriminator: no ``netD.zero_grad()`` to remember) and
``self.optimizer_step("discriminator")`` steps and zeroes that optimizer. Both optimizers, both LR schedules
and the random state are in every checkpoint: re-running the same command resumes exactly (``--fresh`` with
another ``--checkpoint-dir`` starts over: fitkit never overwrites another run's checkpoints).

One process only: the step calls the two networks directly, outside the DistributedDataParallel wrapper
that fitkit puts around the whole model, so under torchrun their gradients would not be averaged; the
script refuses to run there.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

import fitkit
from fitkit.callbacks import LambdaCallback, LRScheduler, ModelCheckpoint

NZ = 16  # size of the generator's latent vector


def weights_init(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGAN(nn.Module):
    """The generator and the discriminator in one module, so that one ``state_dict`` holds both."""

    def __init__(self, nz: int = NZ, ngf: int = 32, ndf: int = 32) -> None:
        super().__init__()
        self.generator = nn.Sequential(  # (nz, 1, 1) -> (1, 8, 8) in [-1, 1]
            nn.ConvTranspose2d(nz, ngf * 2, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.Conv2d(ngf, 1, 3, 1, 1, bias=False),
            nn.Tanh(),
        )
        self.discriminator = nn.Sequential(  # (1, 8, 8) -> the probability that the image is real
            nn.Conv2d(1, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )
        self.nz = nz
        self.apply(weights_init)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.generator(noise)


class GANTrainer(fitkit.Trainer):
    """pytorch/examples' DCGAN step: update D on a real and a fake batch, then G through D."""

    criterion = nn.BCELoss()

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        real = batch[0]  # fit(images): batches are (images,), no targets
        n = real.shape[0]
        netG, netD = self.model.generator, self.model.discriminator
        real_label = torch.ones(n, device=real.device)
        fake_label = torch.zeros(n, device=real.device)

        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        output = netD(real).view(-1)
        err_d_real = self.criterion(output, real_label)
        self.backward(err_d_real, optimizer="discriminator")
        d_x = output.mean().detach()
        noise = torch.randn(n, self.model.nz, 1, 1, device=real.device)
        fake = netG(noise)
        output = netD(fake.detach()).view(-1)
        err_d_fake = self.criterion(output, fake_label)
        self.backward(err_d_fake, optimizer="discriminator")
        d_g_z1 = output.mean().detach()
        self.optimizer_step("discriminator")

        # (2) Update G: maximize log(D(G(z))); its gradients go to the generator only
        output = netD(fake).view(-1)
        err_g = self.criterion(output, real_label)
        self.backward(err_g, optimizer="generator")
        self.optimizer_step("generator")

        self.outputs = fake  # what callbacks see as trainer.outputs
        return {
            "d_loss": (err_d_real + err_d_fake).detach(),
            "g_loss": err_g.detach(),
            "d_x": d_x,
            "d_g_z": d_g_z1,
        }


def load_images(limit: int | None = None) -> torch.Tensor:
    """The digits as (N, 1, 8, 8) images in [-1, 1], in a fixed order."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
    return images[order][:limit]


def build_trainer(
    lr: float = 2e-4, step_size: int = 10, gamma: float = 0.5, callbacks: list[fitkit.Callback] | None = None, **kw: Any
) -> GANTrainer:
    """The model, both optimizers (DCGAN's Adam settings) and a StepLR schedule for each."""
    model = DCGAN()
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    schedules = [
        LRScheduler(torch.optim.lr_scheduler.StepLR(opt_g, step_size=step_size, gamma=gamma)),
        LRScheduler(torch.optim.lr_scheduler.StepLR(opt_d, step_size=step_size, gamma=gamma)),
    ]
    return GANTrainer(
        model, {"generator": opt_g, "discriminator": opt_d}, loss=None, callbacks=schedules + (callbacks or []), **kw
    )


def save_samples(trainer: GANTrainer, path: str, count: int = 64) -> None:
    """A grid of generated digits from a private generator (the run's random stream is not touched)."""
    from torchvision.utils import save_image

    noise = torch.randn(count, trainer.model.nz, 1, 1, generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        images = trainer.model(noise.to(trainer.device)).cpu()
    save_image(images, path, nrow=8, normalize=True, value_range=(-1, 1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default="checkpoints/gan")
    parser.add_argument("--samples", default=None, help="save a PNG grid of generated digits here (torchvision)")
    parser.add_argument("--fresh", action="store_true", help="start over (with an empty --checkpoint-dir)")
    parser.add_argument("--fast", action="store_true", help="2 epochs on 256 images: a smoke test in seconds")
    parser.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs = min(args.epochs, 2)

    fitkit.seed_everything(args.seed)
    images = load_images(256 if args.fast else None)
    epochs_run: list[int] = []  # by this call: a resumed run restores the earlier epochs' history too
    trainer = build_trainer(
        lr=args.lr,
        callbacks=[
            ModelCheckpoint(f"{args.checkpoint_dir}/epoch{{epoch:02d}}.pt", monitor=None, save_top_k=2),
            LambdaCallback(on_epoch_end=lambda epoch, logs: epochs_run.append(epoch)),
        ],
        device=args.device,
        verbose=args.verbose,
    )
    if trainer.world_size > 1:
        raise SystemExit(
            f"examples/gan.py runs in one process (launched with {trainer.world_size}): its train_step calls "
            "netG and netD outside the DDP wrapper, so their gradients would not be averaged across processes"
        )
    start = time.perf_counter()
    history = trainer.fit(images, batch_size=args.batch_size, epochs=args.epochs, resume=None if args.fresh else "auto")
    elapsed = time.perf_counter() - start
    if args.samples and trainer.is_global_zero:
        save_samples(trainer, args.samples)
    final = {key: values[-1] for key, values in history.history.items()} if history.epoch else {}
    shown = ", ".join(f"{key} {value:.4g}" for key, value in final.items())
    print(f"trained {len(epochs_run)} epoch(s) in {elapsed:.1f}s on {trainer.device}; final {shown}")
    return final


if __name__ == "__main__":
    main()
