"""HF <-> Megatron names and tensor layouts for Qwen2.5-VL: the one place this mapping lives.

Megatron ("mcore") names here are the parameter names of `Qwen25VLModel` built at TP=1, PP=1 with the
torch/local spec, with *global* decoder-layer indices, e.g. `language_model.decoder.layers.3.mlp.linear_fc1.weight`.
`canonical_mcore_name` also accepts the TE spec's fused-layernorm names and the distributed checkpoint's keys.
HF names are the on-disk Qwen2.5-VL names (`model.layers.N.…`, `model.embed_tokens.weight`, `lm_head.weight`,
`visual.…`); `normalize_hf_name` also accepts transformers 5's in-memory names (`model.language_model.…`,
`model.visual.…`).

Layouts (the subtle part):
- qkv: Megatron fuses q, k, v per query group, [g0: q heads of g0, k0, v0 | g1: …], so that a TP split along
  dim 0 hands each rank whole groups. HF keeps q_proj [np*hn, h], k_proj / v_proj [ng*hn, h] apart.
- fc1: Megatron's SwiGLU computes silu(x W_gate) * (x W_up) from one matmul with W = cat(W_gate, W_up) on
  dim 0. Under TP each rank holds cat(gate_r, up_r), so shards must be merged/split half by half
  (`merge_tp_shards`, `split_for_tp`), not by a plain cat/chunk.
- TP split dims: column-parallel weights (qkv, fc1, vocab embedding, output layer) on dim 0; row-parallel
  (attention out proj, fc2) on dim 1; norms and the replicated vision tower are not split.
- tied embeddings: HF has no lm_head tensor; Megatron keeps a copy on the last pipeline stage only when it
  differs from the first. That copy maps to `model.embed_tokens.weight`, and is skipped on export.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch

from pebr_mega.errors import CheckpointError
from pebr_mega.models.arch import QwenVLArch

MC_LAYER = "language_model.decoder.layers."
HF_LAYER = "model.layers."
MC_VISION = "vision_model."
HF_VISION = "visual."
EMBED = "language_model.embedding.word_embeddings.weight"
FINAL_NORM = "language_model.decoder.final_layernorm.weight"
OUTPUT = "language_model.output_layer.weight"
HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

# Decoder-layer suffixes that are a plain rename (mcore -> HF).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# TE spec (and the distributed checkpoint) fuse the pre-attention / pre-MLP norms into the next linear.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_QKV = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_FC1 = "mlp.linear_fc1.weight"
_LAYER_RE = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


def canonical_mcore_name(name: str) -> str:
    """Map TE-spec / checkpoint spellings and DDP wrappers (`module.`) to the canonical mcore name."""
    while name.startswith("module."):
        name = name[len("module."):]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_ALIASES:
        return f"{MC_LAYER}{m.group(1)}.{_TE_ALIASES[m.group(2)]}"
    return name


def normalize_hf_name(name: str) -> str:
    """Map transformers 5 in-memory names to the on-disk Qwen2.5-VL names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def tp_split_dim(mcore_name: str) -> int | None:
    """The dim along which tensor parallelism shards this parameter, or None when it is replicated."""
    name = canonical_mcore_name(mcore_name)
    if name in (EMBED, OUTPUT):
        return 0
    m = _LAYER_RE.match(name)
    if not m:
        return None
    suffix = m.group(2)
    if suffix in _QKV or suffix == _FC1:
        return 0
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return 1
    return None


def _is_glu(mcore_name: str) -> bool:
    return canonical_mcore_name(mcore_name).endswith("." + _FC1)


def split_for_tp(mcore_name: str, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of the full tensor `full` (a view where possible)."""
    dim = tp_split_dim(mcore_name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise CheckpointError(f"{mcore_name}: dim {dim} of shape {tuple(full.shape)} does not split over tp={tp_size}")
    if _is_glu(mcore_name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def merge_tp_shards(mcore_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_for_tp`: the full tensor from the TP shards in rank order."""
    dim = tp_split_dim(mcore_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_glu(mcore_name):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


class HFMapping:
    """Name and layout conversion for one architecture (head counts decide the qkv layout)."""

    def __init__(self, arch: QwenVLArch) -> None:
        self.arch = arch
        t = arch.text
        self.np, self.ng, self.hn = t.num_heads, t.num_kv_heads, t.head_dim
        self.tied = t.tie_word_embeddings

    # ------------------------------------------------------------------------------------------ names
    def mcore_names(self) -> list[str]:
        """Every canonical mcore parameter name of the full model (no output layer when tied)."""
        names = [EMBED]
        for i in range(self.arch.text.num_layers):
            p = f"{MC_LAYER}{i}."
            names += [p + s for s in ("input_layernorm.weight", *_QKV, "self_attention.linear_proj.weight",
                                      "pre_mlp_layernorm.weight", _FC1, "mlp.linear_fc2.weight")]
        names.append(FINAL_NORM)
        if not self.tied:
            names.append(OUTPUT)
        return names

    def hf_names(self, mcore_name: str) -> list[str]:
        """The HF tensors that make up `mcore_name`, in fusion order."""
        name = canonical_mcore_name(mcore_name)
        if name == EMBED:
            return [HF_EMBED]
        if name == FINAL_NORM:
            return [HF_NORM]
        if name == OUTPUT:
            return [HF_EMBED] if self.tied else [HF_LM_HEAD]
        if name.startswith(MC_VISION):
            return [HF_VISION + name[len(MC_VISION):]]
        m = _LAYER_RE.match(name)
        if not m:
            raise CheckpointError(f"no HF counterpart for Megatron parameter '{mcore_name}'")
        i, suffix = m.group(1), m.group(2)
        p = f"{HF_LAYER}{i}."
        if suffix in _LAYER_RENAMES:
            return [p + _LAYER_RENAMES[suffix]]
        if suffix in _QKV:
            kind = suffix.rsplit(".", 1)[1]
            return [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"]
        if suffix == _FC1:
            return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        raise CheckpointError(f"no HF counterpart for Megatron parameter '{mcore_name}'")

    # --------------------------------------------------------------------------------------- tensors
    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rest = q.shape[1:]
        q = q.reshape(self.ng, self.np // self.ng, self.hn, *rest)
        k = k.reshape(self.ng, 1, self.hn, *rest)
        v = v.reshape(self.ng, 1, self.hn, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def _split_qkv(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        rest = qkv.shape[1:]
        per = self.np // self.ng
        x = qkv.reshape(self.ng, per + 2, self.hn, *rest)
        return [x[:, :per].reshape(self.np * self.hn, *rest).contiguous(),
                x[:, per].reshape(self.ng * self.hn, *rest).contiguous(),
                x[:, per + 1].reshape(self.ng * self.hn, *rest).contiguous()]

    def hf_to_mcore_tensor(self, mcore_name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The full mcore tensor `mcore_name`, fused from the HF tensors returned by `get(hf_name)`."""
        parts = [get(h) for h in self.hf_names(mcore_name)]
        suffix = canonical_mcore_name(mcore_name)
        if suffix.endswith(_QKV[0]) or suffix.endswith(_QKV[1]):
            return self._fuse_qkv(*parts)
        if suffix.endswith(_FC1):
            return torch.cat(parts, dim=0)
        return parts[0]

    def mcore_to_hf_tensors(self, mcore_name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs for the full (TP-merged) mcore tensor; [] for a tied output layer."""
        name = canonical_mcore_name(mcore_name)
        if name == OUTPUT and self.tied:
            return []
        hf = self.hf_names(name)
        if name.endswith(_QKV[0]) or name.endswith(_QKV[1]):
            return list(zip(hf, self._split_qkv(full)))
        if name.endswith(_FC1):
            gate, up = full.chunk(2, dim=0)
            return [(hf[0], gate.contiguous()), (hf[1], up.contiguous())]
        return [(hf[0], full)]

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every language-model HF tensor (the vision tower is checked against the module)."""
        t = self.arch.text
        h, f, v = t.hidden_size, t.intermediate_size, t.vocab_size
        q, kv = self.np * self.hn, self.ng * self.hn
        shapes = {HF_EMBED: (v, h), HF_NORM: (h,)}
        if not self.tied:
            shapes[HF_LM_HEAD] = (v, h)
        for i in range(t.num_layers):
            p = f"{HF_LAYER}{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            })
        return shapes

    def check_tied_lm_head(self, get: Callable[[str], torch.Tensor | None]) -> set[str]:
        """With tied embeddings a checkpoint may still store `lm_head.weight`; it must equal the embedding.

        Returns {"lm_head.weight"} when such a (redundant) tensor is present, else an empty set.
        """
        if not self.tied:
            return set()
        head = get(HF_LM_HEAD)
        if head is None:
            return set()
        if not torch.equal(head, get(HF_EMBED)):
            raise CheckpointError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
        return {HF_LM_HEAD}

    # ------------------------------------------------------------------------------------ whole states
    def hf_to_mcore_state(self, hf_state: Mapping[str, torch.Tensor],
                          vision_names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Full mcore state from a full HF state; every HF tensor must be used exactly once.

        `vision_names` (mcore names of the tower) defaults to every `visual.*` key present in `hf_state`.
        """
        hf = {normalize_hf_name(k): v for k, v in hf_state.items()}
        shapes = self.expected_hf_shapes()

        def get(name: str) -> torch.Tensor:
            if name not in hf:
                raise CheckpointError(f"HF checkpoint is missing tensor '{name}'")
            if name in shapes and tuple(hf[name].shape) != shapes[name]:
                raise CheckpointError(f"HF tensor '{name}' has shape {tuple(hf[name].shape)}, expected {shapes[name]}")
            return hf[name]

        if vision_names is None:
            vision_names = [MC_VISION + k[len(HF_VISION):] for k in hf if k.startswith(HF_VISION)]
        names = self.mcore_names() + list(vision_names)
        out = {n: self.hf_to_mcore_tensor(n, get) for n in names}
        used = {h for n in names for h in self.hf_names(n)} | self.check_tied_lm_head(hf.get)
        unused = sorted(set(hf) - used)
        if unused:
            raise CheckpointError(f"HF checkpoint has tensors this architecture does not use: {unused[:8]}")
        return out

    def mcore_to_hf_state(self, mcore_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full HF state from a full (TP-merged, all stages) mcore state."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in mcore_state.items():
            for hf_name, t in self.mcore_to_hf_tensors(name, tensor):
                out[hf_name] = t
        return out
