"""Predicting sine waves with two LSTM cells and L-BFGS (generated data: nothing is downloaded).

    python examples/lbfgs.py                     # 8 L-BFGS steps on 50 waves of 200 points: ~100 s
    python examples/lbfgs.py --fast              # 2 steps on 10 waves of 50 points, a few seconds

pytorch/examples' time_sequence_prediction on fitkit's default step: ``torch.optim.LBFGS`` needs a closure
that re-evaluates the loss, and fitkit builds it (zero the gradients, forward, loss, backward, clipping) and
calls ``optimizer.step(closure)``, as the tutorial does by hand. Each epoch is one full-batch L-BFGS step;
the logged ``loss`` is the loss before the step (what ``step`` returns), ``val_loss`` the loss on the three
held-out waves after it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import fitkit


class Sequence(nn.Module):
    """Two stacked LSTM cells read a wave one point at a time and predict the next point."""

    def __init__(self, hidden: int = 51) -> None:
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, hidden)
        self.lstm2 = nn.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, inputs: torch.Tensor, future: int = 0) -> torch.Tensor:
        outputs = []
        n = inputs.size(0)
        h_t = c_t = inputs.new_zeros(n, self.hidden)
        h_t2 = c_t2 = inputs.new_zeros(n, self.hidden)
        output = inputs.new_zeros(n, 1)
        for input_t in inputs.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs.append(output)
        for _ in range(future):  # continue the wave from its own predictions
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs.append(output)
        return torch.cat(outputs, dim=1)


def sine_waves(count: int = 100, length: int = 400, period: int = 20, seed: int = 2) -> torch.Tensor:
    """The tutorial's generate_sine_wave.py: ``count`` waves of ``length`` points, random phases."""
    rs = np.random.RandomState(seed)
    x = np.arange(length) + rs.randint(-4 * period, 4 * period, count).reshape(count, 1)
    return torch.from_numpy(np.sin(x / 1.0 / period).astype("float64"))


def split_waves(data: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, next points) for training (waves 3 on) and validation (the first three)."""
    return (data[3:, :-1], data[3:, 1:]), (data[:3, :-1], data[:3, 1:])


def build_trainer(lr: float = 0.8, callbacks: list[fitkit.Callback] | None = None, **kw: Any) -> fitkit.Trainer:
    model = Sequence().double()
    return fitkit.Trainer(model, torch.optim.LBFGS(model.parameters(), lr=lr), "mse", callbacks=callbacks, **kw)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="L-BFGS steps (epochs of one full batch)")
    parser.add_argument("--waves", type=int, default=50)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (float64: not mps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="2 steps on 10 waves of 50 points")
    parser.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.waves, args.length = min(args.steps, 2), 10, 50

    fitkit.seed_everything(args.seed)
    (x, y), (x_val, y_val) = split_waves(sine_waves(args.waves, args.length))
    trainer = build_trainer(args.lr, device=args.device, verbose=args.verbose)
    start = time.perf_counter()
    history = trainer.fit((x, y), (x_val, y_val), batch_size=len(x), shuffle=False, epochs=args.steps)
    elapsed = time.perf_counter() - start
    with torch.no_grad():  # extrapolate the held-out waves 100 points past their end
        trainer.model.eval()
        future = trainer.model(x_val.to(trainer.device), future=100)[:, -100:].cpu()
    final = {key: values[-1] for key, values in history.history.items()}
    print(
        f"trained {len(history.epoch)} L-BFGS step(s) in {elapsed:.1f}s on {trainer.device}; final loss "
        f"{final['loss']:.3e}, val_loss {final['val_loss']:.3e}; extrapolated 100 points, range "
        f"[{future.min():.2f}, {future.max():.2f}]"
    )
    return final


if __name__ == "__main__":
    main()
