#!/usr/bin/env python
"""Compare `pebr plan`'s memory model with the peak memory measured on a GPU (target: within 15%).

    python tools/check_plan_memory.py [--layers 4] [--vision-layers 4] [--seq 4096] [--sequences 2]
                                      [--record docs/PERFORMANCE.md]

Two measurements on one GPU, each against the plan's prediction for exactly that configuration:

1. the train step of `tools/bench_train_step.py` (Qwen2.5-VL-7B widths, `--layers` decoder layers and
   `--vision-layers` ViT blocks, bf16, one 1008x1008 image per sequence, forward + backward through Megatron's
   cross-entropy, plain bf16 gradients): `torch.cuda.max_memory_allocated` of the second step;
2. one GRPO update of the Megatron actor on the same shapes (bf16, its fp32 gradient buffer, fp32 main
   parameters, Adam, a frozen reference model resident, `--sequences` packed sequences of `--seq` tokens in one
   micro-batch, the Triton log-prob and GRPO-loss kernels): the peak of the second `train_step`.

The prediction counts what the caching allocator holds (`max_memory_allocated` cannot see the CUDA context or
NCCL buffers, and the allocator's fragmentation headroom is not allocated memory). Needs CUDA (exits with status 2
without it).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 0.15
HEADING = "## Memory plan vs measured"
HEADER = ("| date | card | what | layers (LM+ViT) | tokens | predicted GiB | measured GiB | error |\n"
          "|---|---|---|---|---|---|---|---|")
GIB = 2**30


def bench_prediction(arch, seq: int, grid: tuple[int, int, int]) -> float:
    """Bytes of bench_train_step's step: the bf16 parameters, plus the larger of two moments of backward: its start
    (the CUDA-profile activations; Megatron's vocab-parallel cross-entropy keeps an fp32 softmax [T, V] and writes
    its bf16 gradient; the output layer's weight gradient and the hidden-state gradient) and its end (every bf16
    parameter gradient; the bench frees them between steps)."""
    from pebr_mega.plan import memory as mem

    sp = mem.stage_params(arch, 1, 1, 0)
    mb = mem.MicroBatch(seq, (grid,))
    acts = mem.stage_activation_bytes(arch, sp, mb, 1, 2, "none", 1, False, mem.CUDA, last=True)
    V, h = arch.text.vocab_size, arch.text.hidden_size
    cross_entropy = seq * V * 4 + seq * V * 2
    grads = max(V * h, sp.largest_layer_tensor) * 2 + seq * h * 2
    return sp.total * 2 + max(sum(acts.values()) + cross_entropy + grads, sp.total * 2)


def measure_bench(arch, seq: int, image: tuple[int, int]) -> tuple[float, tuple[int, int, int]]:
    """bench_train_step's model and batch; the peak of the second forward + backward."""
    import torch

    from bench_train_step import make_batch
    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.qwen25_vl import build_model

    cfg = ModelConfig(spec="torch", params_dtype="bfloat16")
    model = build_model(arch, cfg, perform_initialization=True).train()
    batch, grid = make_batch(arch, seq, image, 1, torch.device("cuda"))
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    for i in range(2):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        model(**batch).float().mean().backward()
        for p in model.parameters():
            p.grad = None
    peak = torch.cuda.max_memory_allocated()
    del model, batch
    torch.cuda.empty_cache()
    return peak, tuple(int(x) for x in grid[0].tolist())


def grpo_config(seq: int, sequences: int):
    from pebr_mega.config import load_config

    return load_config(None, ["model.spec=torch", "model.params_dtype=bfloat16", "actor.distributed_optimizer='off'",
                              f"actor.micro_batch_tokens={seq * sequences}", "actor.kernels=triton",
                              f"grpo.rollout_batch_size={sequences}", f"grpo.mini_batch_size={sequences}",
                              "rollout.n=1", f"rollout.max_new_tokens={seq // 2}",
                              f"data.max_prompt_length={seq - seq // 2}"])


def grpo_prediction(arch, cfg, grid: tuple[int, int, int]) -> float:
    """The plan's training table for one GPU without the rows the allocator does not hold (contexts, headroom)."""
    from pebr_mega.plan.hardware import gpu_spec
    from pebr_mega.plan.planner import training_table, workload_from_config
    from pebr_mega.plan.timing import Layout

    w = dataclasses.replace(workload_from_config(cfg, arch, "grpo"), image_grid=grid)
    table = training_table(arch, cfg, w, Layout(1, 1, 1), gpu_spec("h100-80gb"), rollout=False, distributed=False,
                           stage=0)
    return sum(r.bytes for r in table.rows if r.counted and not r.name.startswith(("CUDA context", "caching-allocator")))


def measure_grpo(arch, cfg, seq: int, sequences: int, image: tuple[int, int]) -> float:
    """Actor + frozen reference on this GPU; old/ref log-probs, then two GRPO updates; the second one's peak."""
    import torch

    from bench_train_step import make_batch
    from pebr_mega.actor.megatron_actor import LossSpec, MegatronActor
    from pebr_mega.actor.packing import ActorSequence
    from pebr_mega.models.qwen25_vl import build_model

    def actor(trainable: bool):
        model = build_model(arch, cfg.model, perform_initialization=True)
        return MegatronActor(model, cfg.model, cfg.actor, trainable=trainable)

    policy, reference = actor(True), actor(False)
    seqs = []
    for i in range(sequences):
        batch, grid = make_batch(arch, seq, image, 1, torch.device("cpu"))
        ids = batch["input_ids"][0].tolist()
        mask = [0] * (seq - seq // 2) + [1] * (seq // 2)
        seqs.append(ActorSequence(ids, mask, batch["pixel_values"], grid, advantage=1.0 if i % 2 else -1.0, index=i))
    for q, (lp, _) in zip(seqs, policy.compute_logprobs(seqs, 1.0)):
        q.old_logprobs = lp
    for q, (lp, _) in zip(seqs, reference.compute_logprobs(seqs, 1.0)):
        q.ref_logprobs = lp
    loss = LossSpec("grpo", cfg.algo, 1.0)
    policy.train_step(seqs, loss)  # the first update allocates Adam's moments
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    policy.train_step(seqs, loss)
    return torch.cuda.max_memory_allocated()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--sequences", type=int, default=2, help="GRPO: sequences packed in the one micro-batch")
    p.add_argument("--image", default="1008x1008")
    p.add_argument("--record", default=None, help="markdown file to add the rows to (section '" + HEADING + "')")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("check_plan_memory: needs a CUDA GPU and none is visible; nothing was measured", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from bench_train_step import qwen25_vl_7b_arch
    from pebr_mega.parallel.groups import init_parallel

    init_parallel(1, 1)
    arch = qwen25_vl_7b_arch(args.layers, args.vision_layers)
    image = tuple(int(x) for x in args.image.split("x"))
    rows = []
    measured, grid = measure_bench(arch, args.seq, image)
    rows.append(("bench_train_step fwd+bwd", args.seq, bench_prediction(arch, args.seq, grid), measured))
    cfg = grpo_config(args.seq, args.sequences)
    measured = measure_grpo(arch, cfg, args.seq, args.sequences, image)
    rows.append(("GRPO update (actor + reference)", args.seq * args.sequences, grpo_prediction(arch, cfg, grid), measured))
    card = torch.cuda.get_device_name()
    lines = []
    for what, tokens, pred, meas in rows:
        err = pred / meas - 1
        lines.append(f"| {datetime.date.today()} | {card} | {what} | {args.layers}+{args.vision_layers}v | {tokens} | "
                     f"{pred / GIB:.2f} | {meas / GIB:.2f} | {err:+.1%} |")
    print(HEADER)
    print("\n".join(lines))
    worst = max(abs(pred / meas - 1) for _, _, pred, meas in rows)
    print(f"target: within {TARGET:.0%}: {'met' if worst <= TARGET else 'NOT met'} (worst {worst:.1%})")
    if args.record:
        from perf_docs import add_table_row

        for line in lines:
            add_table_row(args.record, HEADING, HEADER, line)
        print(f"recorded in {args.record}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
