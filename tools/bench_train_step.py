#!/usr/bin/env python
"""Benchmark one forward+backward step of a Qwen2.5-VL-7B-shaped Megatron model on one GPU.

    python tools/bench_train_step.py [--layers 4] [--vision-layers 4] [--seq 4096] [--spec torch]
                                     [--image 1008x1008] [--steps 10] [--record docs/PERFORMANCE.md]

Random weights, bf16, the real 7B widths (hidden 3584, FFN 18944, 28 heads / 4 KV groups, vocab 152064,
ViT 1280 wide with window attention) with fewer layers. The sequence holds one image's tokens (default
1008x1008 px -> 1296 tokens) plus text up to --seq. Reports time per step, model TFLOP/s (matmul FLOPs from
`pebr_mega.models.flops`, fwd+bwd = 3x fwd), tokens/s and peak memory, as one markdown table row; --record
appends it to a "## Train step" section of the given file. Needs CUDA (exits with status 2 without it);
`--smoke` runs tiny shapes on CPU to check the script itself (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_TFLOPS_H200 = 600.0


def qwen25_vl_7b_arch(layers: int, vision_layers: int):
    """Qwen2.5-VL-7B-Instruct's shapes (its config.json) with `layers` decoder and `vision_layers` ViT blocks."""
    from pebr_mega.models.arch import QwenVLArch, TextArch, VisionArch

    fullatt = tuple(i for i in range(vision_layers) if (i + 1) % 8 == 0) or (vision_layers - 1,)
    text = TextArch(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=layers, num_heads=28,
                    num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24),
                    tie_word_embeddings=False, max_position_embeddings=128000)
    vision = VisionArch(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=fullatt, tokens_per_second=2, in_channels=3, hidden_act="silu",
                        rope_theta=10000.0)
    return QwenVLArch(text=text, vision=vision, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)


def tiny_arch():
    """Toy shapes for CPU smoke runs (`--smoke` here, `--model tiny` in bench_grpo_step): the code path, not the
    speed."""
    from pebr_mega.models.arch import QwenVLArch, TextArch, VisionArch

    text = TextArch(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(2, 3, 3), tie_word_embeddings=False,
                    max_position_embeddings=4096)
    vision = VisionArch(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=(1,),
                        tokens_per_second=2, in_channels=3, hidden_act="silu", rope_theta=10000.0)
    # vision start, vision end (= start + 1), image, video: distinct ids at the top of the vocabulary
    return QwenVLArch(text=text, vision=vision, image_token_id=509, video_token_id=510, vision_start_token_id=507)


def make_batch(arch, seq: int, image_hw: tuple[int, int] | None, micro_batch: int, device):
    """Random tokens with one image per sample (between vision-start and text), 3-D positions and labels."""
    import torch

    from pebr_mega.models.rope_index import get_rope_index

    v = arch.vision
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(arch.text.vocab_size, arch.image_token_id) - 8, (micro_batch, seq), generator=g)
    grid, pixels = None, None
    if image_hw is not None:
        unit = v.patch_size * v.spatial_merge_size
        gh, gw = image_hw[0] // unit * v.spatial_merge_size, image_hw[1] // unit * v.spatial_merge_size
        n_tok = gh * gw // v.spatial_merge_size**2
        if n_tok + 16 > seq:
            raise SystemExit(f"bench_train_step: the image needs {n_tok} tokens, more than --seq {seq} allows")
        ids[:, 8] = arch.vision_start_token_id
        ids[:, 9:9 + n_tok] = arch.image_token_id
        grid = torch.tensor([[1, gh, gw]] * micro_batch)
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
        pixels = torch.randn(micro_batch * gh * gw, patch, generator=g)
    pos, _ = get_rope_index(ids, grid, image_token_id=arch.image_token_id, spatial_merge_size=v.spatial_merge_size)
    labels = torch.randint(0, arch.text.vocab_size, (micro_batch, seq), generator=g)
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels, "pixel_values": pixels, "image_grid_thw": grid}
    return {k: (t.to(device) if t is not None else None) for k, t in batch.items()}, grid


def run(args) -> dict:
    import torch

    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.flops import train_step_flops
    from pebr_mega.models.qwen25_vl import build_model
    from pebr_mega.parallel.groups import init_parallel

    cuda = torch.cuda.is_available() and not args.smoke
    if not torch.cuda.is_available():
        # the CPU smoke run: Megatron's CUDA assumptions mapped to CPU for the rest of this process
        from pebr_mega.parallel.cpu_compat import enable_cpu_compat

        enable_cpu_compat()
    arch = tiny_arch() if args.smoke else qwen25_vl_7b_arch(args.layers, args.vision_layers)
    seq = 256 if args.smoke else args.seq
    image = (112, 168) if args.smoke else (None if args.no_image else tuple(int(x) for x in args.image.split("x")))
    init_parallel(1, 1)
    cfg = ModelConfig(spec=args.spec, params_dtype="float32" if args.smoke else "bfloat16",
                      recompute_granularity=args.recompute)
    model = build_model(arch, cfg, perform_initialization=True).train()
    device = next(model.parameters()).device
    batch, grid = make_batch(arch, seq, image, args.micro_batch, device)
    if batch["pixel_values"] is not None:
        batch["pixel_values"] = batch["pixel_values"].to(cfg.torch_dtype)

    def step() -> None:
        loss = model(**batch).float().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / args.steps
    flops = train_step_flops(arch, seq, grid, batch=args.micro_batch)
    return {
        "card": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "layers": f"{arch.text.num_layers}+{arch.vision.depth}v", "seq": seq, "micro_batch": args.micro_batch,
        "image_tokens": int(grid.prod(-1).sum()) // 4 // args.micro_batch if grid is not None else 0,
        "spec": cfg.spec, "recompute": cfg.recompute_granularity,
        "ms": sec * 1e3, "tflops": flops / sec / 1e12, "tokens_per_s": seq * args.micro_batch / sec,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "date": datetime.date.today().isoformat(),
    }


HEADER = ("| date | card | layers (LM+ViT) | seq | mb | image tokens | spec | recompute | ms/step | model TFLOP/s "
          "| tokens/s | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    return (f"| {r['date']} | {r['card']} | {r['layers']} | {r['seq']} | {r['micro_batch']} | {r['image_tokens']} | "
            f"{r['spec']} | {r['recompute']} | {r['ms']:.1f} | {r['tflops']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_gib']:.1f} |")


def record(path: Path, row: str) -> None:
    """Add `row` to the table of the '## Train step' section of `path` (created if needed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from perf_docs import add_table_row

    add_table_row(path, "## Train step", HEADER, row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the 7B has 28)")
    p.add_argument("--vision-layers", type=int, default=4, help="ViT blocks (the 7B has 32)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--image", default="1008x1008", help="HxW pixels of the one image per sample")
    p.add_argument("--no-image", action="store_true", help="text only")
    p.add_argument("--spec", default="torch", choices=["torch", "te", "local", "auto"])
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--record", default=None, help="markdown file to append the result row to")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, not the speed")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.")
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_train_step: needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "nothing was measured. Use --smoke to check the script on CPU.", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from pebr_mega.errors import PebrError

    try:
        r = run(args)
    except PebrError as e:
        print(f"bench_train_step: error: {e}", file=sys.stderr)
        return 2
    print(HEADER)
    row = table_row(r)
    print(row)
    if "H200" in r["card"]:
        verdict = "meets" if r["tflops"] >= TARGET_TFLOPS_H200 else "below"
        print(f"target >= {TARGET_TFLOPS_H200:.0f} model TFLOP/s on an H200: {verdict}")
    if args.record:
        record(Path(args.record), row)
        print(f"recorded in {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
