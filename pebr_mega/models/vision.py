"""The Qwen2.5-VL vision tower in plain torch, replicated on every tensor-parallel rank.

Why replicated and not TP-sharded: the ViT is ~10% of the model FLOPs (675 M of 8.3 B parameters for the 7B,
and it sees only the image tokens), its attention is over short windows, and sharding it would add two
all-reduces per block for little gain. Every TP rank of the first pipeline stage therefore holds the whole
tower and computes the same image embeddings. Its gradients are identical on all TP ranks in exact
arithmetic (the gradient reaching `decoder_input` is all-reduced by Megatron's column-parallel input), and
every parameter carries `average_gradients_across_tp_domain = True`, so Megatron's `finalize_model_grads`
averages them over the TP group and the replicas can never drift apart. Each block's attention over all
windows (or all frames, in the full-attention blocks) of all images is one variable-length call
(`pebr_mega.models.attention.varlen_attention`, `cu_seqlens` over the windows); the window order and both
segment layouts are planned once per forward on the host, from the (host) image grids.

Parameter names equal the HF names below `visual.` so the checkpoint mapping is the identity for the tower.

Flow (as Qwen2.5-VL does it): patches (already flattened by the image processor, in 2x2 merge-block order)
-> linear patch embedding -> reorder merge-blocks window by window -> blocks (window attention, except the
`fullatt_block_indexes`, which attend over a whole frame) with 2-D rotary on (row, col) patch coordinates ->
RMSNorm + concat of each 2x2 block + MLP (the merger) -> undo the window order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pebr_mega.models.arch import VisionArch
from pebr_mega.models.attention import Segments, varlen_attention


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Qwen2.5-VL's vision tower does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel is one matmul per patch; the weight keeps the Conv3d shape."""

    def __init__(self, arch: VisionArch) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(
            torch.empty(arch.hidden_size, arch.in_channels, arch.temporal_patch_size, arch.patch_size, arch.patch_size)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype).reshape(patches.shape[0], -1), w.reshape(w.shape[0], -1))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    """Multi-head self-attention with fused qkv, 2-D rotary, over variable-length segments."""

    def __init__(self, arch: VisionArch, attention: str = "auto") -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        self.attention = attention
        self.qkv = nn.Linear(arch.hidden_size, 3 * arch.hidden_size, bias=True)
        self.proj = nn.Linear(arch.hidden_size, arch.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        # Rotary in float32 (as the reference does), then back to the activation dtype.
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = varlen_attention(q, k, v, segments, causal=False, backend=self.attention)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    """SwiGLU MLP with biases (names as in HF: gate_proj, up_proj, down_proj)."""

    def __init__(self, arch: VisionArch) -> None:
        super().__init__()
        if arch.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu"):
            raise ValueError(f"vision hidden_act {arch.hidden_act!r} is not supported")
        self.act = arch.hidden_act
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=True)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=True)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=True)

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "silu":
            return F.silu(x)
        if self.act == "quick_gelu":
            return x * torch.sigmoid(1.702 * x)
        return F.gelu(x, approximate="tanh" if self.act == "gelu_pytorch_tanh" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._activate(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, arch: VisionArch, attention: str = "auto") -> None:
        super().__init__()
        self.norm1 = RMSNorm(arch.hidden_size)
        self.norm2 = RMSNorm(arch.hidden_size)
        self.attn = VisionAttention(arch, attention)
        self.mlp = VisionMLP(arch)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate each 2x2 merge block, project to the LLM width with a GELU MLP."""

    def __init__(self, arch: VisionArch) -> None:
        super().__init__()
        self.merged = arch.hidden_size * arch.spatial_merge_size**2
        self.ln_q = RMSNorm(arch.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, arch.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


# ------------------------------------------------------------------------------------------ index helpers
def patch_rc_coordinates(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's order: frame, merge-block row-major, then inside the block.

    Returns [N, 2] long. For a frame of h x w patches the blocks are (h/m) x (w/m); patch (r, c) sits in block
    (r // m, c // m) at offset (r % m, c % m).
    """
    out = []
    for t, h, w in grid_thw.tolist():
        br, bc, ir, ic = torch.meshgrid(
            torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge), torch.arange(merge), indexing="ij"
        )
        rc = torch.stack([(br * merge + ir).flatten(), (bc * merge + ic).flatten()], dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def window_order(grid_thw: torch.Tensor, merge: int, window_merged: int) -> tuple[torch.Tensor, list[int]]:
    """The permutation of merged tokens that groups them window by window, and the window lengths in patches.

    Each frame's grid of merged tokens (h/m x w/m) is tiled by `window_merged`-sided windows, row-major,
    with the last row/column of windows cut short at the border; within a window tokens stay row-major.
    Returns (index [num_merged_tokens] long, per-window lengths counted in patches = merged tokens * m^2).
    """
    index, lengths, base = [], [], 0
    ws = window_merged
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw) + base
        nh, nw = -(-gh // ws), -(-gw // ws)
        padded = F.pad(ids, (0, nw * ws - gw, 0, nh * ws - gh), value=-1)
        windows = padded.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        keep = windows >= 0
        index.append(windows[keep])
        lengths.extend((keep.sum(-1) * merge * merge).tolist())
        base += t * gh * gw
    return torch.cat(index).to(grid_thw.device), [n for n in lengths if n > 0]


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per frame: full-attention blocks attend within one frame of one image."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


class VisionTower(nn.Module):
    """Qwen2.5-VL's ViT: `forward(pixel_values [N, C*T*P*P], grid_thw [images, 3]) -> [N / m^2, out_hidden]`."""

    def __init__(self, arch: VisionArch, recompute: bool = False, attention: str = "auto") -> None:
        super().__init__()
        self.arch = arch
        self.recompute = recompute
        self.patch_embed = PatchEmbed(arch)
        self.blocks = nn.ModuleList(VisionBlock(arch, attention) for _ in range(arch.depth))
        self.merger = PatchMerger(arch)
        self.fullatt = set(arch.fullatt_block_indexes)
        self.window_merged = arch.window_size // arch.spatial_merge_size // arch.patch_size
        for p in self.parameters():
            # Read by Megatron's finalize_model_grads: average these grads over the TP group (see module doc).
            p.average_gradients_across_tp_domain = True

    def rotary(self, grid_thw: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, head_dim] in float32 for every patch, in processor order.

        2-D rotary: head_dim/2 channels rotate with the row, head_dim/2 with the column, each with head_dim/4
        frequencies. Computed in float32 on every call (cheap) so a bf16 model keeps exact angles.
        """
        quarter = self.arch.head_dim // 2
        inv_freq = 1.0 / (self.arch.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float, device=device) / quarter))
        rc = patch_rc_coordinates(grid_thw, self.arch.spatial_merge_size).to(device)
        freqs = (rc[..., None].float() * inv_freq).flatten(1)  # [N, 2 * head_dim/4] = (rows, cols)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        unit = self.arch.spatial_merge_size**2
        grid = grid_thw.cpu()  # image sizes are host metadata: keep them there (the actor passes them on the host)
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        if n != int(grid.prod(-1).sum()):
            raise ValueError(f"pixel_values has {n} patches but image_grid_thw describes {int(grid.prod(-1).sum())}")
        order, window_lens = window_order(grid, self.arch.spatial_merge_size, self.window_merged)
        restore = torch.argsort(order).to(x.device, non_blocking=True)
        order = order.to(x.device, non_blocking=True)
        windows = Segments.from_lengths(window_lens, x.device)
        frames = Segments.from_lengths(frame_lengths(grid), x.device)
        cos, sin = self.rotary(grid, x.device)

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        # Window order keeps each frame contiguous (windows are cut per frame), so full attention over a frame
        # is still one contiguous segment of the reordered sequence.
        x, cos, sin = by_window(x), by_window(cos), by_window(sin)
        for i, block in enumerate(self.blocks):
            segments = frames if i in self.fullatt else windows
            if self.recompute and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, segments, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments)
        merged = self.merger(x)
        return merged[restore]
