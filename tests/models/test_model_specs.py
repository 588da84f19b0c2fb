"""Layer-spec selection and the SDPA core attention against a float64 reference."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pebr_mega.errors import BackendUnavailableError
from pebr_mega.models.config import ModelConfig
from pebr_mega.models.specs import TE_INSTALL, SDPACoreAttention, resolve_spec, te_available


def test_te_spec_fails_at_startup_with_install_command():
    if te_available() and torch.cuda.is_available():
        pytest.skip("Transformer Engine is usable here")
    with pytest.raises(BackendUnavailableError) as err:
        resolve_spec("te")
    assert "transformer" in str(err.value).lower() and ("install" in str(err.value) or "CUDA" in str(err.value))
    if not te_available():
        assert TE_INSTALL in str(err.value)


def test_auto_resolves_to_torch_without_te_and_cuda():
    expected = "te" if te_available() and torch.cuda.is_available() else "torch"
    assert resolve_spec("auto") == expected
    assert resolve_spec("local") == "local" and resolve_spec("torch") == "torch"
    with pytest.raises(ValueError, match="not one of"):
        resolve_spec("flash")


def test_model_config_cross_checks():
    from pebr_mega.config_fields import ConfigError

    with pytest.raises(ConfigError, match="'model.fp8'"):
        ModelConfig(spec="torch", fp8="hybrid")
    with pytest.raises(ConfigError, match="'model.sequence_parallel'"):
        ModelConfig(spec="local", tp=2, sequence_parallel=True)
    with pytest.raises(ConfigError, match="'model.sequence_parallel'"):
        ModelConfig(spec="torch", tp=1, sequence_parallel=True)
    with pytest.raises(ConfigError, match="'model.tp' = 0"):
        ModelConfig(tp=0)
    ModelConfig(spec="torch", tp=2, sequence_parallel=True)  # TorchRMSNorm runs sequence-parallel
    ModelConfig(spec="te", fp8="e4m3", tp=2)


def _reference(q, k, v, allowed):
    """float64 softmax attention; q [s, b, np, hn], k/v [s, b, ng, hn], allowed [b or 1, 1, sq, sk] bool."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", torch.softmax(scores, -1), v).reshape(q.shape[0], q.shape[1], -1)


def _attn():
    cfg = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0, kv_channels=8)
    return SDPACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self").eval()


def test_sdpa_core_attention_causal_and_masked_with_gqa():
    torch.manual_seed(0)
    s, b, np_, ng, hn = 7, 2, 4, 2, 8
    q = torch.randn(s, b, np_, hn, dtype=torch.float64)
    k, v = (torch.randn(s, b, ng, hn, dtype=torch.float64) for _ in range(2))
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(_attn()(q, k, v, None), _reference(q, k, v, causal), atol=1e-12)
    # Megatron's mask convention: True = masked out. Mask out key 2 in batch row 1 on top of causality.
    meg_mask = ~causal.expand(b, 1, s, s).clone()
    meg_mask[1, :, 3:, 2] = True
    assert torch.allclose(_attn()(q, k, v, meg_mask), _reference(q, k, v, ~meg_mask), atol=1e-12)


def test_torch_spec_norms_are_marked_for_the_sequence_parallel_grad_all_reduce():
    from types import SimpleNamespace

    from pebr_mega.models.specs import TorchRMSNorm, layer_spec

    spec = layer_spec("torch")
    assert spec.submodules.input_layernorm is TorchRMSNorm and spec.submodules.pre_mlp_layernorm is TorchRMSNorm
    for sp in (False, True):
        norm = TorchRMSNorm(SimpleNamespace(sequence_parallel=sp), 8, eps=1e-6)
        assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is sp and norm.eps == 1e-6


def test_sdpa_core_attention_packed_thd_is_block_diagonal_causal():
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(1)
    lens = [3, 6, 2]
    t, np_, ng, hn = sum(lens), 4, 1, 8
    q = torch.randn(t, np_, hn, dtype=torch.float64)
    k, v = (torch.randn(t, ng, hn, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 3, 9, 11], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    ref = _reference(q[:, None], k[:, None], v[:, None], allowed[None, None])[:, 0]
    assert torch.allclose(_attn()(q, k, v, None, packed_seq_params=params), ref, atol=1e-12)


def test_model_section_in_the_root_config():
    from pebr_mega.config import ConfigError, load_config

    cfg = load_config(None, ["model.tp=2", "model.pp=2", "model.spec=torch", "model.params_dtype=float32"])
    assert (cfg.model.tp, cfg.model.pp, cfg.model.spec, cfg.model.torch_dtype) == (2, 2, "torch", torch.float32)
    with pytest.raises(ConfigError, match="model.spec"):
        load_config(None, ["model.spec=flash"])
    with pytest.raises(ConfigError, match="model.fp8"):
        load_config(None, ["model.fp8=e5m2"])
    cfg = load_config(None, ["model.attention=varlen", "actor.logprobs_from=hidden", "algo.agg=token-mean-microbatch"])
    assert (cfg.model.attention, cfg.actor.logprobs_from, cfg.algo.agg) == ("varlen", "hidden", "token-mean-microbatch")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=xformers"])
