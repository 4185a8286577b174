"""The gated BiLSTM encoder: a CPU-cheap alternative to the transformer, with the same `embed()` interface.

Word embeddings (initialisable from a BERT/BGE checkpoint, or from its principal components at a smaller width) ->
projection if the widths differ -> N bidirectional LSTM layers, each with a highway gate (or a plain residual) ->
pooling (gated attention, mean or max over the real tokens) -> projection to the embedding size -> L2 normalisation.

Padding never leaks into the states of real tokens. Each direction is its own LSTM, and the backward one reads
every sequence reversed within its own length, so in both directions a real token's state depends on real tokens
only (padding always comes after them). Two layouts share the same layers, as in bge/model.py:
  padded: (B, L, W); the recurrence runs over padded tensors (oneDNN's fused LSTM: on CPU its backward pass is
          ~10x faster than that of packed sequences), padding positions compute don't-care values;
  packed: the real tokens alone, run through the LSTMs as PackedSequences; the reference the padded path is
          tested against, and the layout that never computes a padding position at all.
Inputs are right-padded, as bge.tokenizer.Tokenizer.pad makes them.

Saved as `bge_config.json` + `model.safetensors` (our own names) + the tokenizer files by bge/weights.py;
transformers and sentence-transformers cannot load this architecture.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_sequence, unpack_sequence

from bge.dropout import Dropout
from bge.errors import UserError
from bge.model import Encoder, pool, run_layers

# how a layer's two LSTMs run over x in one layout: (forward LSTM, backward LSTM, x) -> (..., 2 * hidden)
Recur = Callable[[nn.LSTM, nn.LSTM, torch.Tensor], torch.Tensor]
POOLING = ("attention", "mean", "max")
EMBED_INIT = ("model", "random")  # the word table: copied (or PCA-projected) from the source checkpoint, or fresh


@dataclass
class LSTMConfig:
    """Architecture of the gated BiLSTM; written to bge_config.json with "arch": "bilstm"."""

    vocab_size: int = 30522
    embed_size: int = 384  # word embedding width (the initialising checkpoint's hidden size)
    hidden_size: int = 192  # per direction: every layer carries 2 * hidden_size features
    num_layers: int = 2
    dim: int = 384  # the sentence embedding size
    dropout: float = 0.1
    pad_token_id: int = 0
    max_tokens: int = 512  # longest input; carried over from the source checkpoint's tokenizer
    layer_norm_eps: float = 1e-5
    pooling: str = "attention"  # gated attention, mean or max over the real tokens (POOLING)
    normalize: bool = True
    highway: bool = True  # a highway gate in each layer; False: a plain residual, LN(x + lstm(x))

    @property
    def width(self) -> int:
        return 2 * self.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)


class GatedLayer(nn.Module):
    """One bidirectional LSTM layer with a highway gate: out = LN(g * drop(lstm(x)) + (1 - g) * x), where
    g = sigmoid(W [x; lstm(x)]) per feature, so each token chooses how much of the layer to take; without the gate
    (cfg.highway False) a plain residual, LN(x + drop(lstm(x))). `recur` runs the two LSTMs in the caller's layout,
    so the layer works on padded (B, L, W) and packed (T, W) inputs alike."""

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.fwd = nn.LSTM(cfg.width, cfg.hidden_size, batch_first=True)
        self.bwd = nn.LSTM(cfg.width, cfg.hidden_size, batch_first=True)  # reads each sequence reversed
        self.gate = nn.Linear(2 * cfg.width, cfg.width) if cfg.highway else None
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, recur: Recur) -> torch.Tensor:
        h = recur(self.fwd, self.bwd, x)
        if self.gate is None:
            return self.ln(x + self.drop(h))
        g = torch.sigmoid(self.gate(torch.cat([x, h], dim=-1)))
        return self.ln(g * self.drop(h) + (1 - g) * x)


def reverse_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) index that reverses each right-padded row within its length and leaves padding in place; its own
    inverse."""
    lengths = attention_mask.sum(1, keepdim=True)
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(t < lengths, lengths - 1 - t, t)


def recur_padded(fwd: nn.LSTM, bwd: nn.LSTM, x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """Both directions over a padded (B, L, W) batch; `rev` from reverse_index."""
    rev = rev.unsqueeze(-1)
    back = bwd(x.gather(1, rev.expand_as(x)))[0]
    return torch.cat([fwd(x)[0], back.gather(1, rev.expand_as(back))], dim=-1)


def recur_packed(fwd: nn.LSTM, bwd: nn.LSTM, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Both directions over the real tokens (T, W), sequences back to back, as PackedSequences."""
    seqs = x.split(lengths)
    ahead = unpack_sequence(fwd(pack_sequence(seqs, enforce_sorted=False))[0])
    back = unpack_sequence(bwd(pack_sequence([s.flip(0) for s in seqs], enforce_sorted=False))[0])
    return torch.cat([torch.cat(ahead), torch.cat([b.flip(0) for b in back])], dim=-1)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): score_t = w . (tanh(V h_t) * sigmoid(U h_t)); the embedding is
    the softmax(score)-weighted sum of the token states, over real tokens only."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.v = nn.Linear(width, hidden)
        self.u = nn.Linear(width, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.w(torch.tanh(self.v(states)) * torch.sigmoid(self.u(states))).squeeze(-1)
        return attention_pool(states, scores, attention_mask)


def attention_pool(states: torch.Tensor, scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) states, (B, L) scores -> (B, H): the sum of states weighted by softmax(scores) over real tokens."""
    scores = scores.float().masked_fill(~attention_mask.bool(), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(states.dtype)
    return torch.einsum("bl,blh->bh", weights, states)


def max_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) states -> (B, H): each feature's largest value over the real tokens."""
    return states.masked_fill(~attention_mask.bool().unsqueeze(-1), float("-inf")).amax(1)


def pca_project(table: torch.Tensor, k: int) -> torch.Tensor:
    """(V, H) word table -> (V, k): each row, centred, in the coordinates of the table's top k principal
    components (largest variance first); a narrower table that keeps as much of the rows' spread as k dimensions can."""
    centred = table.double() - table.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:k].T).to(table.dtype)


class BiLSTMEncoder(nn.Module):
    """Gated BiLSTM sentence encoder: `embed(input_ids, attention_mask)` -> (B, dim) L2-normalised embeddings."""

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        if cfg.pooling not in POOLING:
            raise ValueError(f"unknown pooling {cfg.pooling!r} ({', '.join(POOLING)})")
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.embed_size, padding_idx=cfg.pad_token_id)
        self.proj = nn.Linear(cfg.embed_size, cfg.width) if cfg.embed_size != cfg.width else nn.Identity()
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(GatedLayer(cfg) for _ in range(cfg.num_layers))
        self.pool = GatedAttentionPool(cfg.width, cfg.hidden_size) if cfg.pooling == "attention" else None
        self.out = nn.Linear(cfg.width, cfg.dim)
        self.grad_checkpointing = False  # recompute each layer in backward: less memory, more time
        self.init_weights()

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def init_weights(self) -> None:
        """Embeddings N(0, 0.02) with a zero padding row (replaced by a checkpoint's in `from_encoder`); linear
        layers Xavier-uniform with zero biases; LSTM input matrices Xavier-uniform, recurrent matrices orthogonal
        per gate, biases zero except the forget gate's 1 (so early training remembers); LayerNorms unit."""
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LSTM):
                h = m.hidden_size
                for name, p in m.named_parameters():
                    if name.startswith("weight_ih"):
                        nn.init.xavier_uniform_(p)
                    elif name.startswith("weight_hh"):
                        for gate in p.split(h):  # PyTorch's gate order: input, forget, cell, output
                            nn.init.orthogonal_(gate)
                    else:  # bias_ih and bias_hh are added, so the forget gate's 1 goes in one of them
                        nn.init.zeros_(p)
                        if name.startswith("bias_ih"):
                            nn.init.ones_(p[h : 2 * h])
        with torch.no_grad():
            self.emb.weight[self.cfg.pad_token_id].zero_()

    @classmethod
    def from_encoder(cls, encoder: Encoder, *, hidden_size: int, num_layers: int, dim: int = 0,
                     dropout: float = 0.1, embed_dim: int = 0, embed_init: str = "model", highway: bool = True,
                     pooling: str = "attention") -> "BiLSTMEncoder":
        """A fresh BiLSTM with a transformer's vocabulary and tokenizer. Its word table (embed_dim wide; 0 = the
        transformer's hidden size) is the transformer's ("model"; projected onto its top principal components when
        narrower) or fresh ("random"). dim = 0: the transformer's embedding size, so the two embed alike wide."""
        src = encoder.cfg
        width = embed_dim or src.hidden_size
        if not 0 < width <= src.hidden_size:
            raise UserError(f"--lstm-embed-dim must be between 1 and the model's hidden size {src.hidden_size} "
                            f"(0 = that size), got {embed_dim}")
        if embed_init not in EMBED_INIT:
            raise UserError(f"--lstm-embed-init must be one of {', '.join(EMBED_INIT)}, got {embed_init!r}")
        cfg = LSTMConfig(vocab_size=src.vocab_size, embed_size=width, hidden_size=hidden_size,
                         num_layers=num_layers, dim=dim or src.hidden_size, dropout=dropout,
                         pad_token_id=src.pad_token_id, max_tokens=src.max_tokens, pooling=pooling, highway=highway)
        model = cls(cfg)
        if embed_init == "model":
            table = encoder.emb.word.weight.detach()
            with torch.no_grad():
                model.emb.weight.copy_(table if width == src.hidden_size else pca_project(table, width))
        return model.to(encoder.emb.word.weight.device)

    # ---- forward --------------------------------------------------------------------------------
    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> None:
        """Override the dropout rate for fine-tuning (None or negative keeps it); `attention` has nothing to act on
        here (the pooling softmax has no dropout) and is ignored. Recorded in the config, as Encoder.set_dropout does."""
        if hidden is not None and hidden >= 0:
            if hidden >= 1:
                raise UserError(f"hidden_dropout must be below 1, got {hidden}")
            self.cfg.dropout = float(hidden)
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = self.cfg.dropout

    def _run_layers(self, x: torch.Tensor, recur: Recur) -> torch.Tensor:
        return run_layers(self.layers, x, recur, self.grad_checkpointing and self.training)

    def _embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.emb(input_ids)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last layer states (B, L, W) of a right-padded batch; padding positions hold don't-care values."""
        rev = reverse_index(attention_mask)
        return self._run_layers(self._embed_tokens(input_ids), lambda f, b, x: recur_padded(f, b, x, rev))

    def forward_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last layer states of the real tokens only, (T, W) in row-major order of the padded batch: equal to
        forward(...)[attention_mask.bool()], computed without ever touching a padding position."""
        lengths = attention_mask.sum(1).tolist()
        x = self._embed_tokens(input_ids[attention_mask.bool()])
        return self._run_layers(x, lambda f, b, x: recur_packed(f, b, x, lengths))

    def pooled(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, W) last-layer states -> (B, W), by cfg.pooling over the real tokens."""
        if self.pool is not None:
            return self.pool(states, attention_mask)
        return pool(states, attention_mask, "mean") if self.cfg.pooling == "mean" else max_pool(states, attention_mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Pooled, projected, (by default) L2-normalised sentence embeddings (B, dim)."""
        if packed:
            real = attention_mask.bool()
            tokens = self.forward_packed(input_ids, attention_mask)
            states = tokens.new_zeros(*real.shape, tokens.shape[-1]).index_put((real,), tokens)
        else:
            states = self.forward(input_ids, attention_mask)
        pooled = self.out(self.pooled(states, attention_mask))
        return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled
