"""Train a small CNN from scratch with fused_opt.SGD (Nesterov momentum) and a step schedule.

The data is generated: 16x16 grey images of noisy stripes in one of four orientations
(horizontal, vertical, diagonal, anti-diagonal), a task a small CNN learns in a few epochs.
The loop is the classic one: mini-batches from a DataLoader, SGD with Nesterov momentum and
weight decay, the lr divided by 10 at fixed epochs (MultiStepLR), accuracy on a held-out set.

    python examples/train_cnn_sgd.py --epochs 6
    python examples/train_cnn_sgd.py --optimizer torch.optim   # the same loop with torch.optim
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fused_opt

SIZE = 16
CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")


def make_stripes(count: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    coordinate = torch.stack([rows, cols, rows + cols, rows - cols])  # one per orientation
    labels = torch.randint(len(CLASSES), (count,), generator=gen)
    period = torch.randint(3, 6, (count, 1, 1), generator=gen)
    phase = torch.randint(0, 6, (count, 1, 1), generator=gen)
    stripes = ((coordinate[labels] + phase) % period < period / 2).float()
    images = stripes + 1.0 * torch.randn(count, SIZE, SIZE, generator=gen)
    return TensorDataset(images.unsqueeze(1), labels)


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, len(CLASSES)),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    model.train()
    return correct / len(loader.dataset)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--milestones", type=int, nargs="*", default=[3, 5],
                        help="epochs after which the lr is divided by 10")  # fmt: skip
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    parser.add_argument("--optimizer", choices=["fused_opt", "torch.optim"], default="fused_opt")
    parser.add_argument("--backend", default=None, help="fused_opt backend (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_loader = DataLoader(make_stripes(args.train_size, args.seed), args.batch_size,
                              shuffle=True, drop_last=True)  # fmt: skip
    test_loader = DataLoader(make_stripes(1024, args.seed + 1), 256)
    model = make_cnn()

    hyper = {"lr": args.lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    if args.optimizer == "fused_opt":
        opt = fused_opt.SGD(model.parameters(), backend=args.backend, **hyper)
    else:
        opt = torch.optim.SGD(model.parameters(), **hyper)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)

    steps, step_time, opt_time = 0, 0.0, 0.0
    history = []
    for epoch in range(args.epochs):
        total_loss, batches = 0.0, 0
        for x, y in train_loader:
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before_step = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            step_time, opt_time = step_time + end - start, opt_time + end - before_step
            total_loss, batches, steps = total_loss + loss.item(), batches + 1, steps + 1
            if steps == args.max_steps:
                break
        lr = opt.param_groups[0]["lr"]
        schedule.step()
        history.append({"epoch": epoch, "lr": lr, "loss": total_loss / batches,
                        "accuracy": accuracy(model, test_loader)})  # fmt: skip
        print(f"epoch {epoch}  lr {lr:.4f}  loss {history[-1]['loss']:.4f}  "
              f"test accuracy {history[-1]['accuracy']:.1%}")  # fmt: skip
        if steps == args.max_steps:
            break
    print(f"{args.optimizer}: {1e3 * step_time / steps:.2f} ms/step, optimizer "
          f"{1e3 * opt_time / steps:.3f} ms/step ({opt_time / step_time:.1%})")  # fmt: skip
    return {"history": history, "steps": steps, "model": model}


if __name__ == "__main__":
    main()
