"""Train a ResNet-18 on CIFAR-10: the script a GPU user writes, with fitkit doing the loop.

    python examples/cifar10_resnet.py --data-dir data --download      # fetch CIFAR-10 once (~170 MB)
    python examples/cifar10_resnet.py --data-dir data --compile       # ~94% val accuracy in 30 epochs
    python examples/cifar10_resnet.py --fake-data --epochs 1 --steps-per-epoch 20   # offline: FakeData
    tensorboard --logdir runs/cifar10                                 # the curves, while it trains

What it shows:

* torchvision's CIFAR-10 with the usual augmentation (random 32x32 crop of the 4-pixel padded image,
  horizontal flip) and per-channel normalisation; ``--fake-data`` swaps in torchvision's ``FakeData``
  (random images, same shapes and transforms) to run without the dataset;
* DataLoader workers with pinned memory: batches are decoded and augmented while the GPU trains, and
  fitkit copies them to the GPU without blocking (``non_blocking=True``);
* bf16 autocast where the GPU has it (no GradScaler needed), optional ``torch.compile`` and
  ``channels_last``; ``drop_last=True`` keeps one batch shape, so the compiled model compiles once;
* SGD with Nesterov momentum, a linear warm-up then a cosine decay of the learning rate, every batch;
* the two best checkpoints by ``val_accuracy`` plus a resumable ``last.pt``: re-running the same command
  resumes where the last run stopped (``--fresh`` starts over); TensorBoard curves and hyperparameters.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import fitkit
from fitkit.callbacks import LambdaCallback, LRScheduler, ModelCheckpoint, TensorBoard

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def build_model(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution and no max-pool,
    so that 32x32 images are not shrunk to 8x8 before the first residual block."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_datasets(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_transform = transforms.Compose([transforms.ToTensor(), normalize])
    if args.fake_data:
        val_size = max(1, args.fake_size // 5)
        train = datasets.FakeData(args.fake_size, (3, 32, 32), 10, transform=train_transform, random_offset=0)
        val = datasets.FakeData(val_size, (3, 32, 32), 10, transform=val_transform, random_offset=args.fake_size)
        return train, val
    try:
        train = datasets.CIFAR10(args.data_dir, train=True, download=args.download, transform=train_transform)
        val = datasets.CIFAR10(args.data_dir, train=False, download=args.download, transform=val_transform)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
        raise SystemExit(
            f"CIFAR-10 is not in {args.data_dir!r} ({exc}). Pass --download to fetch it (~170 MB), "
            "--data-dir to point at a copy, or --fake-data to run without it."
        ) from exc
    return train, val


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step: a linear warm-up, then a cosine decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def default_precision(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "32"  # bf16 autocast on a CPU is often slower than float32 for convolutions


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="where CIFAR-10 is (or goes, with --download)")
    data.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    data.add_argument("--fake-data", action="store_true", help="torchvision FakeData instead of CIFAR-10 (offline)")
    data.add_argument("--fake-size", type=int, default=5000, help="FakeData training images (validation: 1/5)")
    data.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes (default: min(8, CPU count))",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=0.2, help="peak learning rate, after the warm-up")
    train.add_argument("--weight-decay", type=float, default=5e-4)
    train.add_argument("--steps-per-epoch", type=int, default=None, help="cap the batches per epoch (smoke tests)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    train.add_argument(
        "--precision", default=None, choices=["32", "bf16", "fp16"], help="default: bf16 on a GPU that has it, else 32"
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    train.add_argument("--channels-last", action="store_true", help="channels-last memory format (GPU convs)")
    train.add_argument("--seed", type=int, default=0)
    output = parser.add_argument_group("output")
    output.add_argument("--checkpoint-dir", default="checkpoints/cifar10")
    output.add_argument("--log-dir", default="runs/cifar10", help="TensorBoard run folder")
    output.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    output.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2])
    args = parser.parse_args(argv)

    fitkit.seed_everything(args.seed)
    train_set, val_set = build_datasets(args)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    pin = device.type == "cuda"
    loader_options = {
        "num_workers": args.workers,
        "pin_memory": pin,
        "persistent_workers": args.workers > 0,
        "prefetch_factor": 4 if args.workers > 0 else None,
    }
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, **loader_options)
    val_loader = DataLoader(val_set, batch_size=2 * args.batch_size, **loader_options)

    model = build_model()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    steps = len(train_loader) if args.steps_per_epoch is None else min(args.steps_per_epoch, len(train_loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.epochs * steps))
    epochs_run: list[int] = []  # by this run: a resumed run restores the earlier epochs' history too
    trainer = fitkit.Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(label_smoothing=0.1),
        metrics=["accuracy"],
        callbacks=[
            LRScheduler(schedule, interval="step"),
            ModelCheckpoint(
                f"{args.checkpoint_dir}/epoch{{epoch:02d}}-{{val_accuracy:.4f}}.pt",
                monitor="val_accuracy",
                save_top_k=2,
                save_last=True,
            ),
            TensorBoard(log_dir=args.log_dir),
            LambdaCallback(on_epoch_end=lambda epoch, logs: epochs_run.append(epoch)),
        ],
        device=device,
        precision=args.precision or default_precision(device),
        compile=args.compile,
        channels_last=args.channels_last,
        verbose=args.verbose,
    )
    start = time.perf_counter()
    history = trainer.fit(
        train_loader,
        val_loader,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        resume=None if args.fresh else "auto",
    )
    elapsed = time.perf_counter() - start
    images = len(epochs_run) * steps * args.batch_size
    final = {key: values[-1] for key, values in history.history.items()} if epochs_run else {}
    summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy") if k in final)
    print(
        f"trained {len(epochs_run)} epoch(s) on {trainer.device} ({trainer.precision}"
        f"{', compiled' if args.compile else ''}) in {elapsed:.1f}s, {images / max(elapsed, 1e-9):,.0f} "
        f"images/s including validation; {summary or 'nothing left to train (pass --fresh to start over)'}"
    )
    return final


if __name__ == "__main__":
    main()
