"""A character-level GPT small enough to pretrain on a CPU in a few minutes.

Prompts and completions have fixed lengths in characters, so batches need no
padding: a sequence is ``prompt + completion`` and its log-probability is the sum
over the completion's characters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CharTokenizer", "GPTConfig", "TinyGPT", "completion_logits", "completion_logps", "sample", "sequence_logps"]


class CharTokenizer:
    """A character vocabulary built from the training text (``chars`` in a fixed order)."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("chars must be a non-empty string of distinct characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        # characters outside the vocabulary become spaces (every cleaned text has spaces)
        space = self._index.get(" ", 0)
        return [self._index.get(c, space) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context: int = 128
    n_layer: int = 3
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, d = x.shape
        h = self.n_head
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # with a cache, the new queries are the last t positions: causal mask offset accordingly
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            s = k.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(a))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, (k, v)


class TinyGPT(nn.Module):
    """Pre-LayerNorm decoder-only transformer with learned positions and tied embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (tied with the output layer), named as in Hugging Face models."""
        return self.tok

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: Tensor, caches: list[tuple[Tensor, Tensor]] | None = None, start: int = 0
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Logits ``[B, T, V]`` for token ids ``[B, T]`` at positions ``start..start+T-1``."""
        t = idx.shape[1]
        if start + t > self.cfg.context:
            raise ValueError(f"sequence of {start + t} tokens exceeds the context of {self.cfg.context}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if caches is None else caches[i])
            new.append(kv)
        logits = self.ln_f(x) @ self.tok.weight.T
        return logits, new

    def save(self, path: str, extra: dict | None = None) -> None:
        torch.save({"config": asdict(self.cfg), "state": self.state_dict(), **(extra or {})}, path)

    @classmethod
    def load(cls, path: str, map_location: str | torch.device = "cpu") -> tuple[TinyGPT, dict]:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        model = cls(GPTConfig(**blob.pop("config")))
        model.load_state_dict(blob.pop("state"))
        return model, blob


def completion_logits(model: TinyGPT, prompts: Tensor, completions: Tensor) -> Tensor:
    """Logits ``[B, L, V]`` predicting each completion token: ``[B, P]`` and ``[B, L]`` ids.

    ``completion_logits(...)[:, t]`` is the prediction of ``completions[:, t]``, so ``completions``
    are its shifted labels. The result is a view of the model's output (the prompt positions
    sliced off), in the model's dtype.
    """
    seq = torch.cat([prompts, completions], dim=1)
    logits, _ = model(seq[:, :-1])
    return logits[:, prompts.shape[1] - 1 :]


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over positions of ``log softmax(logits)[label]``, in float32: ``[B, L, V]``, ``[B, L]`` give ``[B]``."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp.sum(-1)


def completion_logps(model: TinyGPT, prompts: Tensor, completions: Tensor) -> Tensor:
    """Sum of ``log p(completion | prompt)`` per row: ``[B, P]`` and ``[B, L]`` ids give ``[B]``."""
    return sequence_logps(completion_logits(model, prompts, completions), completions)


@torch.no_grad()
def sample(
    model: TinyGPT, prompts: Tensor, length: int, generator: torch.Generator, temperature: float = 1.0
) -> Tensor:
    """Ancestral sampling of ``length`` tokens after each prompt (with a key/value cache)."""
    was_training = model.training
    model.eval()
    logits, caches = model(prompts)
    out = []
    pos = prompts.shape[1]
    for i in range(length):
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(nxt)
        if i + 1 < length:
            logits, caches = model(nxt, caches, start=pos)
            pos += 1
    model.train(was_training)
    return torch.cat(out, dim=1)
