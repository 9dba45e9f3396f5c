"""The PyTorch "Saving and Loading Models" tutorial, done with ckptstore.

Trains the tutorial's CNN (conv1 3->6 k5, pool, conv2 6->16 k5, fc1 400->120, fc2 120->84, fc3 84->10) with
SGD(lr=0.001, momentum=0.9) on synthetic CIFAR-shaped data, checkpoints every epoch (model + optimizer + epoch +
loss), then restores into *fresh* objects, continues training, and checks the result is bit-identical to an
uninterrupted run. It also prints the state_dict sizes the way the tutorial does, from a loaded step.

    python examples/tutorial.py --epochs 4 --resume-after 2 --root ./checkpoints/tutorial
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim

from ckptstore import CheckpointManager


class TheModelClass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def make_objects() -> tuple[nn.Module, optim.Optimizer]:
    torch.manual_seed(0)
    model = TheModelClass()
    return model, optim.SGD(model.parameters(), lr=0.001, momentum=0.9)


def train_epoch(model: nn.Module, opt: optim.Optimizer, epoch: int, batches: int, batch_size: int = 16) -> float:
    # Data depends only on the epoch number, so a resumed run sees exactly the batches an uninterrupted one does.
    g = torch.Generator().manual_seed(1000 + epoch)
    total = 0.0
    for _ in range(batches):
        x = torch.randn(batch_size, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch_size,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / batches


def print_state_dicts(state: dict) -> None:
    print("Model's state_dict:")
    for name, t in state["model"].items():
        print(f"  {name}\t{t.size()}")
    print("Optimizer's state_dict:")
    for name, v in state["optim"].items():
        if name == "state":
            print(f"  state\t{len(v)} entries (momentum_buffer per parameter)")
        else:
            print(f"  {name}\t{v}")


def run(root: str, epochs: int, resume_after: int, batches: int, verbose: bool = True) -> bool:
    say = print if verbose else (lambda *a, **k: None)
    # Reference: an uninterrupted run.
    ref_model, ref_opt = make_objects()
    for epoch in range(epochs):
        train_epoch(ref_model, ref_opt, epoch, batches)

    # Run 1: train, checkpointing every epoch, then "crash" after resume_after epochs.
    model, opt = make_objects()
    with CheckpointManager(root, retention={"keep_last": 3}) as mgr:
        for epoch in range(resume_after):
            loss = train_epoch(model, opt, epoch, batches)
            res = mgr.save(
                epoch,
                {"model": model, "optim": opt},
                epoch=epoch,
                metrics={"loss": loss},
                metadata={"example": "tutorial"},
            )
            say(
                f"epoch {epoch}: loss {loss:.4f} -> saved step {res.step} to {res.url} "
                f"({res.nbytes / 1024:.1f} KiB in {res.files} file(s), {res.seconds * 1000:.1f} ms)"
            )
    del model, opt

    # Run 2: a new process would do exactly this — fresh objects, restore the newest verified step, continue.
    model, opt = make_objects()
    with torch.no_grad():  # make sure nothing of the fresh init survives by accident
        for p in model.parameters():
            p.fill_(float("nan"))
    with CheckpointManager(root) as mgr:
        t0 = time.perf_counter()
        info = mgr.restore({"model": model, "optim": opt})
        say(
            f"restored step {info.step} (epoch {info.epoch}, loss {info.metrics['loss']:.4f}) from {info.url} "
            f"in {(time.perf_counter() - t0) * 1000:.1f} ms"
        )
        if verbose:
            print_state_dicts(mgr.load(info.step))
        for epoch in range((info.epoch or 0) + 1, epochs):
            loss = train_epoch(model, opt, epoch, batches)
            mgr.save(epoch, {"model": model, "optim": opt}, epoch=epoch, metrics={"loss": loss})
            say(f"epoch {epoch}: loss {loss:.4f} (after resume) -> saved step {epoch}")
        say(f"steps kept (keep_last=3): {mgr.steps()}")

    same_model = all(torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()))
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    same_optim = all(torch.equal(ref_state[k]["momentum_buffer"], state[k]["momentum_buffer"]) for k in ref_state)
    say(f"resumed run == uninterrupted run, bit for bit: model {same_model}, optimizer {same_optim}")
    return same_model and same_optim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="./checkpoints/tutorial", help="checkpoint root URL (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--resume-after", type=int, default=2, help="epochs run before the simulated crash")
    ap.add_argument("--batches", type=int, default=20, help="batches per epoch")
    ap.add_argument("--keep", action="store_true", help="keep an existing root instead of starting fresh")
    args = ap.parse_args()
    if not args.keep and "://" not in args.root:
        shutil.rmtree(Path(args.root), ignore_errors=True)
    ok = run(args.root, args.epochs, args.resume_after, args.batches)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
