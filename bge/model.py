"""The BGE encoder: BERT (and the XLM-RoBERTa flavour of bge-m3) written out in plain PyTorch.

Embeddings (word + position + token type) -> LayerNorm -> N post-LN transformer layers -> pooling
(CLS for BGE, mean for MiniLM/e5) -> L2 normalisation. Module names are short (`qkv`, `out`, `ln1`,
`ffn_in`); bge/weights.py maps them to Hugging Face names at load and save time only.

Two input layouts share the same layers, which never look at the layout:
  padded: x is (B, L, H) and attention uses a key-padding mask;
  packed: x is (T, H), the T real tokens of the batch back to back, so the projections and the
          feed-forward (most of the FLOPs) spend nothing on padding; only attention sees a padded view
          (or none at all with FlexAttention and a document mask, on CUDA);
  varlen: the packed layout built on the host (bge/packing.py: no device sync, static shapes if asked), with
          attention through FlashAttention's variable-length kernel on CUDA and the padded view elsewhere.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bge import packing
from bge.dropout import Dropout, attention, written_out
from bge.errors import UserError
from bge.packing import Packed

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU, what BERT and BGE use
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
FLAVOURS = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel"}


@dataclass
class ModelConfig:
    """Architecture (the fields of HF config.json we use) plus the pooling recorded with the model."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    flavour: str = "bert"  # "bert" or "xlm-roberta" (position ids offset past the padding index)
    pooling: str = "cls"  # "cls" (BGE) or "mean" (MiniLM, e5)
    normalize: bool = True
    # keys of the original config.json we do not model, written back unchanged on save
    hf_extra: dict = field(default_factory=dict, repr=False)

    # (our field, HF config.json key)
    HF_KEYS = (
        ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
        ("hidden_act", "hidden_act"), ("max_positions", "max_position_embeddings"),
        ("type_vocab_size", "type_vocab_size"), ("layer_norm_eps", "layer_norm_eps"),
        ("hidden_dropout", "hidden_dropout_prob"), ("attention_dropout", "attention_probs_dropout_prob"),
        ("pad_token_id", "pad_token_id"),
    )

    @classmethod
    def from_hf(cls, hf: dict, pooling: str = "cls", normalize: bool = True, source: str = "config.json") -> "ModelConfig":
        """Read an HF BertConfig/XLMRobertaConfig dict."""
        model_type = hf.get("model_type", "bert")
        if model_type not in FLAVOURS:
            raise UserError(f"{source}: model_type {model_type!r} is not supported (only {', '.join(FLAVOURS)})")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not supported (only 'absolute')")
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported ({', '.join(ACTIVATIONS)})")
        kw = {ours: hf[theirs] for ours, theirs in cls.HF_KEYS if theirs in hf}
        used = {theirs for _, theirs in cls.HF_KEYS} | {"model_type"}
        extra = {k: v for k, v in hf.items() if k not in used}
        return cls(**kw, flavour=model_type, pooling=pooling, normalize=normalize, hf_extra=extra)

    def to_hf(self) -> dict:
        """The config.json that transformers.AutoModel reads."""
        hf = {"position_embedding_type": "absolute", "initializer_range": 0.02, **self.hf_extra}
        hf.update({theirs: getattr(self, ours) for ours, theirs in self.HF_KEYS})
        # we save the bare encoder, whatever head the source checkpoint was trained with
        hf.update(model_type=self.flavour, architectures=[FLAVOURS[self.flavour]])
        return hf

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (XLM-RoBERTa spends padding_idx + 1 rows on its offset)."""
        return self.max_positions - (self.pad_token_id + 1 if self.flavour == "xlm-roberta" else 0)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_extra"}


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word(input_ids) + self.position(position_ids)
        # BGE never uses segment B, so the common case adds row 0 without an index lookup
        x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        return self.drop(self.ln(x))


class Layer(nn.Module):
    """One post-LN BERT layer. `attend` turns the fused qkv projection into attention output of the
    same leading shape, so the layer works on padded (B, L, 3H) and packed (T, 3H) inputs alike."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # HF query, key, value stacked
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.out(attend(self.qkv(x)))))
        return self.ln2(x + self.drop(self.ffn_out(self.act(self.ffn_in(x)))))


def run_layers(layers: nn.ModuleList, x: torch.Tensor, how: Callable, checkpointing: bool) -> torch.Tensor:
    """x through each layer(x, how) in turn; with checkpointing, each layer's activations are recomputed in the
    backward pass instead of kept (less memory, one more forward). Shared by the transformer and the BiLSTM."""
    for layer in layers:
        x = torch.utils.checkpoint.checkpoint(layer, x, how, use_reentrant=False) if checkpointing else layer(x, how)
    return x


class Encoder(nn.Module):
    """BERT-style encoder returning token states (`forward`) or normalised sentence embeddings (`embed`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.grad_checkpointing = False  # recompute each layer in backward: less memory, ~30% more time
        self.passthrough: dict[str, torch.Tensor] = {}  # HF tensors we never use (the pooler), kept for export
        self.attention = "sdpa"  # packed layout only: "flex" = FlexAttention with a document mask (CUDA)
        self.init_weights()

    @property
    def dim(self) -> int:
        return self.cfg.hidden_size

    def init_weights(self) -> None:
        """BERT's initialisation: N(0, 0.02) for every matrix and embedding, zero biases, unit LayerNorms,
        and a zero row for the padding token."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.emb.word.weight[self.cfg.pad_token_id].zero_()

    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> None:
        """Override the dropout rates for fine-tuning; None or negative keeps the model's. The config holds the new
        rates, so an exported folder records what the model was trained with."""
        for name, rate in (("hidden_dropout", hidden), ("attention_dropout", attention)):
            if rate is not None and rate >= 0:
                if rate >= 1:
                    raise UserError(f"{name} must be below 1, got {rate}")
                setattr(self.cfg, name, float(rate))
        for m in self.modules():
            if isinstance(m, nn.Dropout):  # every nn.Dropout here is hidden dropout; attention's is read from cfg
                m.p = self.cfg.hidden_dropout

    # ---- attention for the two layouts ----------------------------------------------------------
    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, 3H) -> three (B, heads, L, head_dim)."""
        B, L, _ = qkv.shape
        q, k, v = qkv.view(B, L, 3, self.cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _attend_padded(self, qkv: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(qkv)
        p = self.cfg.attention_dropout if self.training else 0.0
        # on CPU while training, attention is written out where that is faster (bge/dropout.py says when)
        if written_out(q, p, self.training):
            ctx = attention(q, k, v, key_mask, p)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        B, _, L, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(B, L, -1)

    def _attend_flex(self, qkv: torch.Tensor, block_mask) -> torch.Tensor:
        """Packed (T, 3H) -> (T, H) as one sequence with a document mask: no FLOP on padding, even in attention.
        FlexAttention has no dropout on attention probabilities, so this path trains without it."""
        T = qkv.shape[0]
        q, k, v = qkv.view(1, T, 3, self.cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
        ctx = _flex_attention(q.is_cuda)(q, k, v, block_mask=block_mask)
        return ctx[0].transpose(0, 1).reshape(T, -1)

    def _attend_varlen(self, qkv: torch.Tensor, batch: Packed) -> torch.Tensor:
        """Varlen (T, 3H) -> (T, H): FlashAttention over the sequence offsets where it applies (CUDA, half precision,
        no attention dropout), else through a padded view of the same tokens (exact; with dropout on an H200 the
        jagged-SDPA alternative made the step 2.1x slower than padded attention)."""
        T = qkv.shape[0]
        p = self.cfg.attention_dropout if self.training else 0.0
        if packing.flash_applies(qkv.dtype, p, qkv.is_cuda):
            q, k, v = qkv.view(T, 3, self.cfg.num_heads, -1).unbind(1)
            return packing.attention(q, k, v, batch).reshape(T, -1)
        S, W = len(batch.cu_seqlens) - 1, batch.max_len
        where = batch.sequence * W + batch.positions  # each token's row in the (S * W) grid
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).unsqueeze(1)
        key_mask = (torch.arange(W, device=qkv.device) < lengths)[:, None, None, :]
        grid = qkv.new_zeros(S * W, qkv.shape[-1]).index_copy(0, where, qkv).view(S, W, -1)
        return self._attend_padded(grid, key_mask).reshape(S * W, -1).index_select(0, where)

    # ---- forward --------------------------------------------------------------------------------
    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """BERT counts positions from 0; XLM-RoBERTa from padding_idx + 1, with padding at padding_idx."""
        if self.cfg.flavour == "xlm-roberta":
            return (attention_mask.cumsum(-1) * attention_mask + self.cfg.pad_token_id).long()
        return torch.arange(attention_mask.shape[-1], device=attention_mask.device).expand_as(attention_mask)

    def _run_layers(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        return run_layers(self.layers, x, attend, self.grad_checkpointing and self.training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, L, H) for a padded batch; padding positions hold don't-care values."""
        x = self.emb(input_ids, self.position_ids(attention_mask), token_type_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): True = may attend
        return self._run_layers(x, lambda qkv: self._attend_padded(qkv, key_mask))

    def forward_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the real tokens only, (T, H) in row-major order of the padded batch.
        Equal to forward(...)[attention_mask.bool()], at the cost of the real tokens alone outside attention."""
        B, L = input_ids.shape
        real = attention_mask.bool()
        flat = real.flatten().nonzero().squeeze(1)  # where each real token sits in the (B*L) grid
        x = self.emb(input_ids[real], self.position_ids(attention_mask)[real], None)
        if self.attention == "flex":
            doc = torch.repeat_interleave(torch.arange(B, device=x.device), real.sum(1))  # each token's sequence
            block_mask = create_block_mask(lambda b, h, q, k: doc[q] == doc[k], None, None, len(doc), len(doc),
                                           device=x.device)
            return self._run_layers(x, lambda qkv: self._attend_flex(qkv, block_mask))
        key_mask = real[:, None, None, :]

        def attend(qkv: torch.Tensor) -> torch.Tensor:
            # scatter into a zero-padded grid just for attention, then gather the real rows back
            grid = qkv.new_zeros(B * L, qkv.shape[-1]).index_copy(0, flat, qkv).view(B, L, -1)
            return self._attend_padded(grid, key_mask).reshape(B * L, -1).index_select(0, flat)

        return self._run_layers(x, attend)

    def forward_varlen(self, batch: Packed) -> torch.Tensor:
        """Last hidden states (T, H) of a varlen batch (bge.packing.pack, on this device): the rows of
        forward(...)[attention_mask.bool()] for its texts, then don't-care rows for its padding tokens."""
        positions = batch.positions + (self.cfg.pad_token_id + 1 if self.cfg.flavour == "xlm-roberta" else 0)
        x = self.emb(batch.input_ids, positions, None)
        return self._run_layers(x, lambda qkv: self._attend_varlen(qkv, batch))

    def embed(self, input_ids: torch.Tensor | Packed, attention_mask: torch.Tensor | None = None,
              packed: bool = False) -> torch.Tensor:
        """Pooled, (by default) L2-normalised sentence embeddings (B, H). A Packed batch (bge.packing) takes the
        varlen layout; then attention_mask and packed are not used."""
        if isinstance(input_ids, Packed):
            pooled = packing.pool(self.forward_varlen(input_ids), input_ids, self.cfg.pooling)
        elif packed:
            states = self.forward_packed(input_ids, attention_mask)
            pooled = pool_packed(states, attention_mask, self.cfg.pooling)
        else:
            pooled = pool(self.forward(input_ids, attention_mask), attention_mask, self.cfg.pooling)
        return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled


@functools.cache
def _flex_attention(compiled: bool) -> Callable:
    """FlexAttention is fast only compiled (on CUDA); the eager version is a slow reference, used by CPU tests."""
    return torch.compile(flex_attention) if compiled else flex_attention


def pool(states: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, L, H) token states -> (B, H): the [CLS] state, or the mean over real tokens."""
    if mode == "cls":
        return states[:, 0]
    if mode == "mean":
        m = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {mode!r} (cls or mean)")


def pool_packed(states: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(T, H) packed token states -> (B, H), the same numbers as `pool` on the padded layout."""
    lengths = attention_mask.sum(1)
    starts = lengths.cumsum(0) - lengths  # each sequence's first real token is its [CLS]
    if mode == "cls":
        return states[starts]
    if mode == "mean":
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=states.device), lengths)
        sums = states.new_zeros(len(lengths), states.shape[-1]).index_add_(0, seq, states)
        return sums / lengths.unsqueeze(-1).to(states.dtype)
    raise ValueError(f"unknown pooling {mode!r} (cls or mean)")
