"""Train a small CNN on scikit-learn's handwritten digits (shipped in its wheel: no download).

    python examples/train_digits.py                 # ~98% validation accuracy in a few seconds on a CPU
    python examples/train_digits.py --epochs 5 --precision bf16 --batch-size 32
    tensorboard --logdir runs                        # the curves, while it trains or after

Re-running the same command resumes from the newest good checkpoint in --checkpoint-dir, exactly where the
last run stopped, even if it was killed mid-epoch; --fresh starts over (resume="restart": it deletes the
checkpoints fitkit wrote there, nothing else).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fitkit
from fitkit.callbacks import EarlyStopping, ModelCheckpoint, TensorBoard


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 10),
    )


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))  # a fixed split
    return x[order], y[order]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="runs/train_digits")
    parser.add_argument("--checkpoint-dir", default="checkpoints/train_digits")
    parser.add_argument(
        "--fresh", action="store_true", help="start over: delete the checkpoints fitkit wrote in --checkpoint-dir"
    )
    parser.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2])
    args = parser.parse_args(argv)

    fitkit.seed_everything(args.seed)
    x, y = load_digits()
    model = build_model()
    trainer = fitkit.Trainer(
        model,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        "cross_entropy",
        metrics=["accuracy"],
        callbacks=[
            EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
            ModelCheckpoint(
                f"{args.checkpoint_dir}/epoch{{epoch:02d}}-{{val_accuracy:.4f}}.pt",
                monitor="val_accuracy",
                save_top_k=2,
                save_last=True,
            ),
            TensorBoard(log_dir=args.log_dir),
        ],
        device=args.device,
        precision=args.precision,
        verbose=args.verbose,
    )
    start = time.perf_counter()
    history = trainer.fit(
        (x, y),
        validation_split=0.2,
        batch_size=args.batch_size,
        epochs=args.epochs,
        resume="restart" if args.fresh else "auto",
    )
    elapsed = time.perf_counter() - start
    # EarlyStopping restored the best epoch's weights: report the validation accuracy they reach.
    x_val, y_val = x[int(len(x) * 0.8) :], y[int(len(y) * 0.8) :]
    final = trainer.evaluate((x_val, y_val), batch_size=256)
    epochs_run = len(history.epoch)
    print(
        f"trained {epochs_run} epoch(s) in {elapsed:.1f}s on {trainer.device} ({trainer.precision}); "
        f"final validation accuracy: {final['accuracy']:.4f} (loss {final['loss']:.4f})"
    )
    if trainer.is_global_zero:  # one process writes files under torchrun
        history.plot(path=f"{args.checkpoint_dir}/history.png")  # loss, accuracy and lr per epoch
    return final["accuracy"]


if __name__ == "__main__":
    main()
