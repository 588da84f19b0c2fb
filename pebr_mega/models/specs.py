"""Layer specs for the Qwen2 decoder on Megatron-Core: `te`, `torch` and `local`, chosen by ModuleSpec.

- `te`:    Megatron's Transformer Engine spec (fused layernorm+linear, TE/flash attention, FP8 capable).
           Only when `transformer_engine` imports; asking for it otherwise is a BackendUnavailableError.
- `torch`: Megatron's local spec with the core attention replaced by `SDPACoreAttention`, which calls
           `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
           measured 1.8x faster than the local spec on an H200) and attends a packed micro-batch in one
           variable-length call (`pebr_mega.models.attention`: flash-attn, torch's varlen_attn, or a padded
           SDPA batch). The default on CPU and on GPUs without TE.
- `local`: Megatron's local spec unchanged (unfused softmax attention; no packed sequences).

`auto` resolves to `te` when TE imports and CUDA is present, else `torch`. The choice is made here, once,
by building a different ModuleSpec; no layer branches on the backend.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pebr_mega.errors import BackendUnavailableError
from pebr_mega.versions import require_in_window
from pebr_mega.models.attention import Segments, varlen_attention

TE_INSTALL = 'pip install --no-build-isolation -e ".[gpu]"  # transformer-engine[pytorch], window in setup.py'
SPECS = ("auto", "te", "torch", "local")


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_spec(spec: str, fp8: str = "none") -> str:
    """`auto` -> `te` (TE importable and CUDA present) or `torch`; an explicit `te` must be loadable.

    `fp8` other than "none" needs the `te` spec: with `auto` resolving to `torch` (no TE, or no CUDA) that is
    an error, not a silent bf16 run (Megatron's local/torch layers ignore `TransformerConfig.fp8`). A `te`
    choice checks the installed Transformer Engine and Megatron-Core against their windows in setup.py.
    """
    if spec not in SPECS:
        raise ValueError(f"layer spec {spec!r} is not one of {list(SPECS)}")
    resolved = _resolve(spec)
    if fp8 != "none" and resolved != "te":
        raise BackendUnavailableError(
            f"model.fp8={fp8} needs the 'te' layer spec, but model.spec={spec} resolves to {resolved!r} here "
            f"(Transformer Engine imports: {te_available()}, CUDA: {torch.cuda.is_available()}); install "
            f"`{TE_INSTALL}` on a CUDA machine, or set model.fp8=none")
    if resolved == "te":
        require_in_window("te")
    return resolved


def _resolve(spec: str) -> str:
    if spec == "auto":
        return "te" if te_available() and torch.cuda.is_available() else "torch"
    if spec == "te" and not te_available():
        raise BackendUnavailableError(
            f"layer spec 'te' needs NVIDIA Transformer Engine, which does not import here; install it with "
            f"`{TE_INSTALL}` (CUDA machines only), or choose model.spec=torch"
        )
    if spec == "te" and not torch.cuda.is_available():
        raise BackendUnavailableError("layer spec 'te' needs a CUDA GPU; choose model.spec=torch on CPU")
    return spec


class SDPACoreAttention(torch.nn.Module):
    """Megatron core attention computed by `pebr_mega.models.attention` / `F.scaled_dot_product_attention`.

    Inputs follow Megatron's core-attention contract: query [sq, b, np, hn], key/value [sk, b, ng, hn]
    (ng query groups, broadcast to the np heads). Megatron masks are True where attention is NOT allowed;
    SDPA's boolean masks are True where it is, hence the inversion. Without a mask the attention is causal
    (`is_causal=True`, the flash path).

    Packed micro-batches (several samples in one row, each attending causally to itself only) come in two
    forms, both attended in ONE kernel call per layer by `varlen_attention` (backend: `ModelConfig.attention`):
    - `PackedSegments` (qkv_format "sbhd", what the actor packs for this spec): Megatron sees one sequence of
      batch 1, so it applies M-RoPE per token with the plain [s, b, h, d] kernel. (With "thd" Megatron's
      unfused RoPE splits the row sample by sample and reads every boundary back to the host, in every
      layer: megatron/core/models/common/embeddings/rope_utils.py, `_apply_rotary_pos_emb_thd`; with
      per-token M-RoPE frequencies both give the same values.) The segment layout rides along, computed
      once per micro-batch.
    - Megatron's own THD `PackedSeqParams` (query [t, np, hn], `cu_seqlens_q` on the device): the layout is
      derived on the device, without a host sync.
    Output: [sq, b, np * hn] (or [t, np * hn] for THD, which SelfAttention reshapes).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, backend: str = "auto", **kwargs) -> None:
        super().__init__()
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism; use the te spec")
        self.config = config
        self.backend = backend
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q [b, np, s, hn], k/v [b, ng, s, hn]."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=k.shape[1] != q.shape[1],
        )

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type=None, attention_bias: Tensor | None = None, packed_seq_params=None) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask = None if attention_mask is None else ~attention_mask.bool()
        out = self._sdpa(q, k, v, mask)  # [b, np, sq, hn]
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, params) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        segments = getattr(params, "segments", None)
        if params.qkv_format == "thd":
            if segments is None:
                segments = Segments.from_cu_seqlens(params.cu_seqlens_q, params.max_seqlen_q, query.shape[0])
            out = varlen_attention(query, key, value, segments, True, self.scale, self.backend, dropout)
            return out.reshape(out.shape[0], -1)
        if params.qkv_format == "sbhd" and segments is not None:
            if query.shape[1] != 1:
                raise ValueError(f"a packed row has batch size 1, got query of shape {tuple(query.shape)}")
            out = varlen_attention(query[:, 0], key[:, 0], value[:, 0], segments, True, self.scale, self.backend,
                                   dropout)
            return out.reshape(out.shape[0], 1, -1)
        raise ValueError(f"packed qkv_format {params.qkv_format!r} is not supported "
                         "(use 'thd', or PackedSegments from pebr_mega.models.packing)")


class TorchRMSNorm:
    """`torch.nn.RMSNorm` built the way Megatron's specs build norms, and correct under sequence parallelism.

    Megatron's `WrappedTorchNorm` refuses sequence parallelism (megatron/core/transformer/torch_norm.py):
    with SP every TP rank normalises its own slice of the sequence, so each rank's norm-weight gradient is a
    partial sum that must be all-reduced over TP. Megatron's `finalize_model_grads`
    (`_allreduce_non_tensor_model_parallel_grads`) does exactly that for parameters marked
    `sequence_parallel=True`, the mark TE's and Apex's norms set; the forward itself is per token. So a torch
    RMSNorm with the mark runs sequence-parallel exactly.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> torch.nn.RMSNorm:
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = bool(config.sequence_parallel)
        return norm


def layer_spec(spec: str, attention: str = "auto"):
    """The decoder layer ModuleSpec for `spec` (resolved by `resolve_spec` first).

    `attention` picks the packed-attention backend of the `torch` spec (`pebr_mega.models.attention`).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = resolve_spec(spec)
    if spec == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    if spec == "local":
        return base
    torch_spec = copy.deepcopy(base)
    # SelfAttention builds whatever sits in this slot (Megatron's specs put a class there; a ModuleSpec
    # carries constructor arguments).
    torch_spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SDPACoreAttention, params={"backend": attention})
    torch_spec.submodules.input_layernorm = TorchRMSNorm
    torch_spec.submodules.pre_mlp_layernorm = TorchRMSNorm
    return torch_spec


def block_spec(spec: str, config, attention: str = "auto", vp_stage: int | None = None):
    """What `GPTModel` builds its decoder from: for the `torch` spec a block whose final norm is
    `TorchRMSNorm` too (Megatron would pick TE's, Apex's or the SP-refusing torch wrapper by what imports);
    for `te` and `local` the layer spec itself."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = layer_spec(spec, attention)
    if resolve_spec(spec) != "torch":
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=TorchRMSNorm)
