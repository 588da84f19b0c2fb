"""Packed variable-length attention (`pebr_mega.models.attention`) against per-segment float64 attention.

The reference attends every segment on its own with an explicit softmax (repeated key/value heads for
grouped-query attention). The CPU path (`sdpa`: segments padded into one batch, one SDPA call) must equal
it forward and backward on random inputs with uneven lengths, a segment of length 1, GQA, causal and
bidirectional; so must the `torch` spec's core attention fed either packed form. The CUDA tests (marked
`gpu`) run the flash paths (torch's varlen_attn, flash-attn when installed) in bf16 against the same
reference and count the attention kernels launched per call.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pebr_mega.models.attention import (Segments, flash_attn_available, pick_backend, torch_varlen_available,
                                        varlen_attention)

LENGTHS = [5, 1, 9, 3, 9, 2]


def reference(q, k, v, lengths, causal, scale=None):
    """Per-segment softmax attention in float64; q [T, h, d], k/v [T, g, d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        scores = torch.einsum("qhd,khd->hqk", q[s].double(), k[s].double()) * scale
        if causal:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v[s].double()))
        start += n
    return torch.cat(outs)


def random_qkv(lengths, heads, groups, d, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, heads, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t, groups, d, generator=g, dtype=torch.float64) for _ in range(2))
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]


def check_against_reference(lengths, heads, groups, causal, backend="sdpa", dtype=torch.float64, device="cpu",
                            tol=1e-10, seed=0, segments=None):
    q, k, v = random_qkv(lengths, heads, groups, 16, seed, dtype, device)
    seg = segments if segments is not None else Segments.from_lengths(lengths, device)
    out = varlen_attention(q, k, v, seg, causal, backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, lengths, causal)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        torch.testing.assert_close(got.double(), want, rtol=tol * 10, atol=tol * 10, msg=name)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2), (4, 1)])
def test_padded_sdpa_path_equals_per_segment_attention_forward_and_backward(causal, heads, groups):
    check_against_reference(LENGTHS, heads, groups, causal, seed=heads * 3 + groups)


def test_fp32_within_fp32_tolerance_and_equal_lengths_need_no_mask():
    check_against_reference(LENGTHS, 4, 2, causal=True, dtype=torch.float32, tol=2e-5)
    check_against_reference([4, 4, 4], 4, 2, causal=False, dtype=torch.float32, tol=2e-5)
    assert Segments.from_lengths([4, 4, 4]).uniform and not Segments.from_lengths(LENGTHS).uniform


def test_segments_from_device_boundaries_equal_segments_from_lengths():
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    host = Segments.from_lengths(LENGTHS)
    dev = Segments.from_cu_seqlens(cu, max(LENGTHS), sum(LENGTHS))
    assert torch.equal(host.cu_seqlens, dev.cu_seqlens) and host.max_len == dev.max_len
    assert torch.equal(host.slots, dev.slots) and torch.equal(host.tokens, dev.tokens)
    check_against_reference(LENGTHS, 4, 2, causal=True, segments=dev)
    with pytest.raises(ValueError, match="cover|segment of its own"):
        Segments.from_cu_seqlens(cu, 9, sum(LENGTHS) + 3)
    with pytest.raises(ValueError, match="non-empty"):
        Segments.from_lengths([0, 0])


def _core_attention(heads, groups, d):
    from pebr_mega.models.specs import SDPACoreAttention

    cfg = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0, kv_channels=d)
    return SDPACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self", backend="sdpa").eval()


def test_core_attention_packed_forms_equal_the_reference():
    """The actor's form (PackedSegments, sbhd with batch 1) and Megatron's THD form."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from pebr_mega.models.packing import PackedSegments

    heads, groups, d = 4, 2, 16
    q, k, v = random_qkv(LENGTHS, heads, groups, d, seed=7)
    ref = reference(q, k, v, LENGTHS, causal=True).reshape(sum(LENGTHS), -1)
    attn = _core_attention(heads, groups, d)
    sbhd = attn(q[:, None], k[:, None], v[:, None], None,
                packed_seq_params=PackedSegments(segments=Segments.from_lengths(LENGTHS)))
    assert sbhd.shape == (sum(LENGTHS), 1, heads * d)
    torch.testing.assert_close(sbhd[:, 0], ref, rtol=1e-10, atol=1e-10)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    thd = attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                                max_seqlen_q=9, max_seqlen_kv=9))
    torch.testing.assert_close(thd, ref, rtol=1e-10, atol=1e-10)


def test_auto_picks_the_padded_path_on_cpu_and_for_fp32():
    q = torch.zeros(3, 2, 8)
    assert pick_backend("auto", q) == "sdpa" and pick_backend("auto", q.bfloat16()) == "sdpa"
    assert pick_backend("varlen", q, dropout=0.1) == "sdpa"  # the flash varlen kernels have no dropout


def test_explicit_flash_backends_are_refused_where_they_cannot_run():
    from pebr_mega.errors import BackendUnavailableError
    from pebr_mega.models.attention import check_backend

    for choice in ("varlen", "flash_attn"):
        with pytest.raises(BackendUnavailableError, match="CUDA with bfloat16"):
            check_backend(choice, torch.device("cpu"), torch.float32)
    check_backend("sdpa", torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="not one of"):
        check_backend("xformers", torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------------------------- CUDA
CUDA_BACKENDS = ["sdpa", "varlen"] + (["flash_attn"] if flash_attn_available() else [])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backends_equal_the_reference_in_bf16(backend, causal):
    if backend == "varlen" and not torch_varlen_available():
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    lengths = [37, 1, 300, 64, 129, 2]
    # bf16 inputs: compare at bf16 resolution (flash accumulates in fp32)
    check_against_reference(lengths, 8, 2, causal, backend=backend, dtype=torch.bfloat16, device="cuda",
                            tol=2e-2, seed=len(backend))


@pytest.mark.gpu
def test_cuda_fp32_falls_back_to_one_padded_sdpa_call():
    check_against_reference(LENGTHS, 4, 2, True, backend="auto", dtype=torch.float32, device="cuda", tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_one_attention_kernel_per_call_and_no_host_sync(backend):
    """Profile one forward: exactly one attention kernel whatever the number of segments."""
    from torch.profiler import ProfilerActivity, profile

    lengths = [50] * 7 + [3, 1, 200]
    q, k, v = random_qkv(lengths, 8, 2, 64, seed=1, dtype=torch.bfloat16, device="cuda")
    seg = Segments.from_lengths(lengths, "cuda")
    varlen_attention(q, k, v, seg, True, backend=backend)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        varlen_attention(q, k, v, seg, True, backend=backend)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    attention = [n for n in names if any(k in n.lower() for k in ("flash", "fmha", "attention"))
                 and "combine" not in n.lower()]  # a split-KV launch ends in a combine kernel
    assert len(attention) == 1, attention
    syncs = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize")]
    assert syncs == [], syncs
