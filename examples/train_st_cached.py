"""Train a tiny sentence-transformers model with the cached MNRL drop-in at batch 16,384.

    python examples/train_st_cached.py [--batch 16384] [--steps 4] [--mini-batch 2048]

``flashcontrast.compat.sentence_transformers.CachedMultipleNegativesRankingLoss`` is
sentence-transformers' GradCache loss (embed without graphs, take the loss's gradient
with respect to the embeddings, re-embed with graphs mini-batch by mini-batch) with the
loss and its embedding gradients computed in one fused call over the whole batch: no
(N, N) similarity matrix, so the batch is bounded by the embeddings (N x D), not by N^2.
The package's own loss builds (mini_batch, N) slices of it in each of its passes.

The model is built from modules, nothing is downloaded: a bag-of-token-embeddings
encoder (sentence-transformers' ``SentenceTransformer(modules=[...])``). The data are
synthetic "sentences" of token ids: query i and document i draw their tokens from the
same topic (a fixed random set of a few tokens), so in-batch retrieval is learnable. Runs on the
CPU (CUDA when available); prints the loss and the loss step's time per step.
"""

from __future__ import annotations

import argparse
import time

import torch
from sentence_transformers import SentenceTransformer
from torch import nn

from flashcontrast.compat.sentence_transformers import CachedMultipleNegativesRankingLoss

VOCAB, TOPICS, TOPIC_TOKENS, LENGTH = 8192, 1 << 16, 4, 8


class BagOfTokens(nn.Module):
    """(N, L) token ids and mask -> (N, dim) mean of token embeddings, projected."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, features: dict) -> dict:
        mask = features["attention_mask"].unsqueeze(-1).to(self.emb.weight.dtype)
        x = (self.emb(features["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1)
        features["sentence_embedding"] = self.proj(torch.tanh(x))
        return features


def batch(n: int, topics: torch.Tensor, gen: torch.Generator) -> list:
    """[queries, documents]: n token-id "sentences" each, pair i sharing a topic (a row of
    ``topics`` (TOPICS, TOPIC_TOKENS))."""
    rows = topics[torch.randint(0, TOPICS, (n,), generator=gen)]
    out = []
    for _ in range(2):
        pick = torch.randint(0, TOPIC_TOKENS, (n, LENGTH), generator=gen)
        ids = rows.gather(1, pick)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=2048)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = SentenceTransformer(modules=[BagOfTokens()], device=device)
    loss_fn = CachedMultipleNegativesRankingLoss(
        model, scale=20.0, mini_batch_size=args.mini_batch, backend=args.backend
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    topics = torch.randint(0, VOCAB, (TOPICS, TOPIC_TOKENS), generator=gen)
    model.train()
    for step in range(args.steps):
        features = [{k: v.to(device) for k, v in f.items()} for f in batch(args.batch, topics, gen)]
        t0 = time.perf_counter()
        loss = loss_fn(features, None)
        loss.backward()
        seconds = time.perf_counter() - t0
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(
            f"step {step}: loss {loss.item():.4f} (batch {args.batch}, loss step "
            f"{seconds:.2f} s, {device})",
            flush=True,
        )


if __name__ == "__main__":
    main()
