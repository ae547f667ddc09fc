"""A character-level LSTM language model on Python's own ``textwrap.py`` (in every install: no download).

    python examples/lstm_lm.py                   # 10 epochs: 7 s on one busy CPU core, perplexity ~7
    python examples/lstm_lm.py --fast            # 2 epochs on the first 6,000 characters, a few seconds

pytorch/examples' word_language_model/main.py on fitkit, with characters for words. The hidden state is
carried from batch to batch (truncated backpropagation through time) by a ``Trainer`` subclass:

* its own ``on_epoch_begin`` / ``on_validation_begin`` / ``on_predict_begin`` reset the training and the
  evaluation state, so ``fit``, ``evaluate()`` and ``predict()`` start from zeros, with no callback to forget;
* it extends ``state_dict()`` / ``load_state_dict()`` through ``super()``, so a checkpoint holds the
  hidden state and a run resumed mid-epoch equals the uninterrupted one bit for bit;
* gradients are clipped (``grad_clip_norm``) and the learning rate is divided by 4 whenever the
  validation loss does not improve (``ReduceLROnPlateau(factor=0.25, patience=0)``, the tutorial's rule).

One process only: under torchrun fitkit deals the chunks out to the ranks in turn (rank 0 gets chunks 0, 2,
4, ...), so a carried state would join text that is not contiguous; a distributed language model splits the
columns (streams) between the ranks instead. The script refuses to run there.
"""

from __future__ import annotations

import argparse
import inspect
import math
import textwrap
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import fitkit
from fitkit.callbacks import ReduceLROnPlateau

Hidden = tuple[torch.Tensor, torch.Tensor]


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> Linear, with dropout; returns log-probabilities and the new hidden state."""

    def __init__(self, ntoken: int, ninp: int = 32, nhid: int = 128, nlayers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers

    def forward(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, batch_size: int) -> Hidden:
        weight = next(self.parameters())
        shape = (self.nlayers, batch_size, self.nhid)
        return weight.new_zeros(shape), weight.new_zeros(shape)


def repackage_hidden(hidden: Hidden) -> Hidden:
    """The hidden state cut from its history: backpropagation stops at the batch boundary."""
    return (hidden[0].detach(), hidden[1].detach())


class StatefulLMTrainer(fitkit.Trainer):
    """Carries the LSTM's hidden state across batches; resets it at each epoch and validation."""

    #: The hidden state differs between the ranks of a distributed run: each rank keeps its own.
    PER_RANK = (*fitkit.Trainer.PER_RANK, "hidden")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden: Hidden | None = None  # training: carried from one batch to the next
        self.eval_hidden: Hidden | None = None  # validation / evaluate()

    # A Trainer subclass's hooks run before the callbacks, in fit and in evaluate.
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.hidden = None

    def on_validation_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.eval_hidden = None

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.eval_hidden = None

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        tokens, targets = batch
        hidden = self.model.init_hidden(tokens.shape[1]) if self.hidden is None else self.hidden
        with self.autocast():
            output, hidden = self.forward((tokens, hidden))
            loss = self.compute_loss(tokens, targets, output)
        self.backward(loss)
        self.optimizer_step()  # clips to grad_clip_norm first
        self.hidden = repackage_hidden(hidden)
        self.outputs = output
        return {"loss": loss.detach()}

    def eval_step(self, batch: Any) -> dict[str, torch.Tensor]:
        tokens, targets = batch
        hidden = self.model.init_hidden(tokens.shape[1]) if self.eval_hidden is None else self.eval_hidden
        with self.autocast():
            output, self.eval_hidden = self.forward((tokens, hidden), training=False)
            loss = self.compute_loss(tokens, targets, output)
        self.outputs = output
        return {"loss": loss}

    def predict_step(self, batch: Any) -> torch.Tensor:
        tokens = batch[0]
        hidden = self.model.init_hidden(tokens.shape[1]) if self.eval_hidden is None else self.eval_hidden
        with self.autocast():
            output, self.eval_hidden = self.forward((tokens, hidden), training=False)
        return output  # log-probabilities of the next character, (steps * streams, vocabulary)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hidden"] = None if self.hidden is None else [h.cpu() for h in self.hidden]
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        super().load_state_dict(state, strict)
        if per_rank := state.get("per_rank"):  # a distributed run's checkpoint: this rank's own
            state = per_rank[self.dist.rank % len(per_rank)]
        hidden = state.get("hidden")
        self.hidden = None if hidden is None else (hidden[0].to(self.device), hidden[1].to(self.device))


class BpttChunks(Dataset):
    """Item i: ``bptt`` time steps of every column of ``source`` and the next characters as targets."""

    def __init__(self, source: torch.Tensor, bptt: int) -> None:
        self.source, self.bptt = source, bptt

    def __len__(self) -> int:
        return math.ceil((len(self.source) - 1) / self.bptt)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.bptt
        seq_len = min(self.bptt, len(self.source) - 1 - start)
        return self.source[start : start + seq_len], self.source[start + 1 : start + 1 + seq_len].reshape(-1)


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` parallel streams of the text as the columns of a (steps, batch_size) tensor."""
    steps = len(data) // batch_size
    return data[: steps * batch_size].view(batch_size, -1).t().contiguous()


def load_text(limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The characters of ``textwrap.py`` as token ids, and the vocabulary."""
    text = inspect.getsource(textwrap)[:limit]
    vocab = sorted(set(text))
    index = {char: i for i, char in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), vocab


def loaders(
    ids: torch.Tensor, batch_size: int = 16, eval_batch_size: int = 10, bptt: int = 35
) -> tuple[DataLoader, DataLoader]:
    """Training and validation chunks (the last 10% of the text), in order. Each loader draws its worker
    seed from a private generator, so iterating them takes nothing from the global random stream (the
    dropout's), as the tutorial's index loop does not."""
    split = int(len(ids) * 0.9)
    train = BpttChunks(batchify(ids[:split], batch_size), bptt)
    val = BpttChunks(batchify(ids[split:], eval_batch_size), bptt)
    return (
        DataLoader(train, batch_size=None, generator=torch.Generator()),
        DataLoader(val, batch_size=None, generator=torch.Generator()),
    )


def build_trainer(
    ntoken: int, lr: float = 20.0, clip: float = 0.25, callbacks: list[fitkit.Callback] | None = None, **kw: Any
) -> StatefulLMTrainer:
    model = CharLSTM(ntoken)
    plateau = ReduceLROnPlateau(monitor="val_loss", factor=0.25, patience=0, min_delta=0.0)  # lr /= 4
    return StatefulLMTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        "nll",
        callbacks=[plateau, *(callbacks or [])],
        grad_clip_norm=clip,
        **kw,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="2 epochs on 6,000 characters: a smoke test")
    parser.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs = min(args.epochs, 2)

    fitkit.seed_everything(args.seed)
    ids, vocab = load_text(6000 if args.fast else None)
    train_dl, val_dl = loaders(ids, args.batch_size, bptt=args.bptt)
    trainer = build_trainer(len(vocab), args.lr, args.clip, device=args.device, verbose=args.verbose)
    if trainer.world_size > 1:
        raise SystemExit(
            f"examples/lstm_lm.py runs in one process (launched with {trainer.world_size}): split across ranks, "
            "each rank's chunks would not be contiguous text for the carried hidden state"
        )
    start = time.perf_counter()
    history = trainer.fit(train_dl, val_dl, epochs=args.epochs)
    elapsed = time.perf_counter() - start
    final = {key: values[-1] for key, values in history.history.items()}
    test = trainer.evaluate(val_dl)  # the subclass's on_validation_begin resets the state here too
    print(
        f"trained {len(history.epoch)} epoch(s) in {elapsed:.1f}s on {trainer.device}; final loss "
        f"{final['loss']:.4f}, val_loss {test['loss']:.4f} (perplexity {math.exp(test['loss']):.2f} per "
        f"character, {len(vocab)} characters), lr {final['lr']:g}"
    )
    return final


if __name__ == "__main__":
    main()
