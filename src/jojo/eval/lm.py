"""Language-model metrics over batches of (input_ids, targets[, doc_ids]): the one validation-loss code path.

The training loop's validation, `jojo eval --data DIR --split val` and the quickstart all call `evaluate_loss`,
so their figures are the same quantity: the mean loss in nats over every predicted (non-ignored) token.
Bits per byte = loss / ln 2 / (bytes per token of the split).
"""

from __future__ import annotations

import math

import torch

from jojo.device import autocast
from jojo.model import IGNORE_INDEX

LN2 = math.log(2)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    source,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int = 0,
) -> tuple[float, int]:
    """Mean loss (nats per predicted token) over the first `max_batches` batches of `source.iter_sequential`
    (0 = all) and the number of predicted tokens. Each batch's mean is weighted by its token count, so the
    result is the mean over tokens whatever the batch sizes."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # Sums stay on the device and are read once at the end: a float()/int() per batch would make the host wait
    # for the GPU at every batch instead of queueing the next one.
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for batch in source.iter_sequential(max_batches):
        x = batch["input_ids"].to(device)
        y = batch["targets"].to(device)
        kwargs = {"doc_ids": batch["doc_ids"].to(device)} if "doc_ids" in batch else {}
        with autocast(device, dtype):
            _, loss = model(x, y, **kwargs)
        n = (y != IGNORE_INDEX).sum()
        total += torch.where(n > 0, loss.to(total.dtype) * n, 0.0)  # a batch without targets has a NaN mean: skip it
        count += n
    model.train(was_training)
    count = int(count)
    return (float(total) / count if count else float("nan")), count


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / LN2 / bytes_per_token
