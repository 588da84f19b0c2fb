"""Measured memory of the Megatron actor on CPU, for tests/plan/test_plan.py (and anyone re-checking the plan).

Run in spawned gloo ranks: builds the actor for real (Megatron DDP with its fp32 gradient buffer, Megatron's
optimizer), counts the bytes of every parameter, gradient buffer and optimizer tensor (unique storages), and
measures activations with a live-tensor tracker: a `TorchDispatchMode` that adds the bytes of every storage an
op creates and subtracts them when the storage is freed (a weakref finalizer), so it sees what a caching
allocator would have to hold, tensor by tensor, without a GPU.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pebr_mega.models.arch import QwenVLArch, TextArch, VisionArch

TINY_IMAGES = [(8, 8), None, (4, 6), (6, 10)]  # patch grids (h, w): equal and uneven windows, a text-only sample


def tiny_arch(hidden=128, ffn=384, layers=4, heads=4, kv=2, vocab=1030, tied=False, vdepth=2, vhidden=64, vffn=128,
              vheads=2, window=56, fullatt=(1,)) -> QwenVLArch:
    """A tiny Qwen2.5-VL shape (the defaults are the test fixture's `tiny`)."""
    d = hidden // heads
    q = d // 2 // 4
    h = (d // 2 - q) // 2
    text = TextArch(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(q, h, d // 2 - q - h),
                    tie_word_embeddings=tied, max_position_embeddings=4096)
    vision = VisionArch(depth=vdepth, hidden_size=vhidden, intermediate_size=vffn, num_heads=vheads,
                        out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                        window_size=window, fullatt_block_indexes=tuple(fullatt), tokens_per_second=2.0, in_channels=3,
                        hidden_act="silu", rope_theta=10000.0)
    return QwenVLArch(text=text, vision=vision, image_token_id=vocab - 2, video_token_id=vocab - 1,
                      vision_start_token_id=vocab - 3)


def seven_b_reduced(vocab: int = 4096) -> QwenVLArch:
    """Qwen2.5-VL-7B's widths (hidden 3584, FFN 18944, 28 heads / 4 KV, ViT 1280 x 3420) with one decoder layer,
    one ViT block and a `vocab`-token vocabulary (the embeddings scale as V x h: only V is reduced)."""
    return tiny_arch(hidden=3584, ffn=18944, layers=1, heads=28, kv=4, vocab=vocab, vdepth=1, vhidden=1280, vffn=3420,
                     vheads=16, window=112, fullatt=(0,))


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive (`current`) and their maximum (`peak`)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.finalize] = {}

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        nbytes = st.nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)

        def free(key=key, nbytes=nbytes) -> None:
            self.current -= nbytes
            self._live.pop(key, None)

        self._live[key] = weakref.finalize(st, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if len(returns) == 1 or not isinstance(out, (tuple, list)):
            results = [(out, returns[0].alias_info if returns else None)]
        else:
            results = list(zip(out, (r.alias_info for r in returns)))
        for value, alias in results:
            if alias is not None:  # a view or an in-place result: no new storage
                continue
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self._track(t)
        return out


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def state_bytes(ddp, optimizer=None) -> dict[str, int]:
    """Bytes of a DDP model's parameters and gradient buffers, and of the optimizer's tensors (main params, Adam)."""
    params = list(ddp.module.parameters())
    own = {p.untyped_storage().data_ptr() for p in params}
    grads = [b.grad_data for b in ddp.buffers + ddp.expert_parallel_buffers]
    opts = [] if optimizer is None else getattr(optimizer, "chained_optimizers", [optimizer])
    main, adam = [], []
    for o in opts:
        for group in o.optimizer.param_groups:
            main += [p for p in group["params"] if p.untyped_storage().data_ptr() not in own]
        for state in o.optimizer.state.values():
            adam += [v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"params": _storage_bytes(params), "grads": _storage_bytes(grads), "main": _storage_bytes(main),
            "adam": _storage_bytes(adam), "num_params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def random_batch(arch: QwenVLArch, images=TINY_IMAGES, text_tokens: int = 60, seed: int = 0, multiple: int = 16,
                 response: float = 0.25):
    """A packed micro-batch of random GRPO samples, packed by the actor's packer (`actor.packing.pack`, padded to
    `multiple` tokens as the actor pads): each sample a prompt of text around one image (given patch grid) or
    none, whose last `response` share of text tokens are the trained targets with random old and reference
    log-probs and a +-1 advantage; returns (the `actor.packing.MicroBatch`, the images' grids)."""
    from pebr_mega.actor.packing import ActorSequence, pack
    from pebr_mega.models.rope_index import get_rope_index

    g = torch.Generator().manual_seed(seed)
    v = arch.vision
    seqs, grids = [], []
    for i, grid in enumerate(images):
        text = torch.randint(0, arch.vision_start_token_id - 1, (text_tokens + 7 * i,), generator=g)
        pixels = grid_thw = None
        ids = text
        if grid is not None:
            n = grid[0] * grid[1] // v.spatial_merge_size**2
            ids = torch.cat([text[:5], torch.tensor([arch.vision_start_token_id]),
                             torch.full((n,), arch.image_token_id), text[5:]])
            pixels = torch.randn(grid[0] * grid[1], v.in_channels * v.temporal_patch_size * v.patch_size**2,
                                 generator=g)
            grid_thw = torch.tensor([[1, grid[0], grid[1]]])
            grids.append((1, grid[0], grid[1]))
        targets = round(response * len(text))
        mask = [0] * (len(ids) - targets) + [1] * targets
        old = -torch.rand(targets, generator=g) - 0.5
        seqs.append(ActorSequence(ids.tolist(), mask, pixels, grid_thw, advantage=1.0 if i % 2 else -1.0,
                                  old_logprobs=old, ref_logprobs=old + 0.1 * torch.randn(targets, generator=g), index=i))

    def positions(tokens, grid):
        return get_rope_index(torch.tensor([tokens]), grid, image_token_id=arch.image_token_id,
                              spatial_merge_size=v.spatial_merge_size)[0][:, 0]

    return pack(seqs, positions, multiple), grids


def build_stage(arch: QwenVLArch, tp: int, pp: int, dtype: str = "float32", recompute: str = "none",
                vision_recompute: bool = False):
    """This rank's pipeline stage of the Megatron model, small random weights, and its ModelConfig."""
    from megatron.core import parallel_state as mpu

    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.qwen25_vl import build_model

    mc = ModelConfig(spec="torch", tp=tp, pp=pp, params_dtype=dtype, recompute_granularity=recompute,
                     vision_recompute=vision_recompute)
    model = build_model(arch, mc, pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())
    with torch.no_grad():  # built uninitialised (fast at real widths); small values keep the forward finite
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model, mc


def wrap_ddp(model):
    """Megatron's DDP around a stage, configured as `MegatronActor._wrap_ddp` does (fp32 gradient buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=cfg, module=model)


def build_actor(arch: QwenVLArch, tp: int, pp: int, recompute: str = "none", vision_recompute: bool = False,
                freeze_vision: bool = False):
    """A trainable MegatronActor (fp32: Megatron's mixed-precision optimizer refuses CPU tensors) of this rank."""
    from pebr_mega.actor.config import ActorConfig
    from pebr_mega.actor.megatron_actor import MegatronActor

    model, mc = build_stage(arch, tp, pp, "float32", recompute, vision_recompute)
    return MegatronActor(model, mc, ActorConfig(micro_batch_tokens=1 << 20, freeze_vision=freeze_vision, kernels="torch"),
                         trainable=True)


def zero_step(actor) -> None:
    """One optimizer update on zero gradients: Adam allocates its moments (the weights do not move)."""
    actor.model.zero_grad_buffer()
    actor._step_optimizer({"loss_sum": 0.0})


def _on_device(mb):
    """The micro-batch's per-target tensors as the actor's loss moves them to the device (new storages there)."""
    import dataclasses

    fields = ("target_ids", "target_mask", "target_slot", "advantages", "old_logprobs", "ref_logprobs")
    return dataclasses.replace(mb, **{k: getattr(mb, k).clone() for k in fields if getattr(mb, k) is not None})


def measure_activations(model, arch: QwenVLArch, tp: int, images=TINY_IMAGES, text_tokens: int = 60,
                        path: str = "logits", tp_group=None, backward: bool = True) -> dict:
    """Live bytes of one micro-batch through `model` (an actor's DDP model, or a bare stage) and the actor's GRPO
    loss (`actor.losses.grpo_microbatch_loss`, Triton kernels: the interpreter on CPU, log-probs by `path`),
    counted from before its inputs reach the device: after the forward (the inputs autograd kept, saved
    activations, the target logits and the loss's graph) and, with `backward`, at the peak of forward +
    backward."""
    import dataclasses
    import gc

    from pebr_mega.actor.losses import LossScale, grpo_microbatch_loss
    from pebr_mega.algo.grpo import AlgoConfig
    from pebr_mega.models.packing import packed_seq_params

    mb, grids = random_batch(arch, images, text_tokens)
    dtype = next(model.parameters()).dtype
    module = model.module if hasattr(model, "module") else model
    scale = LossScale(float(mb.num_targets), 1, 1)
    model.train()
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    gc.collect()
    live = LiveBytes()
    with live:
        inputs = {"input_ids": mb.input_ids.clone(), "position_ids": mb.position_ids.clone(),
                  "pixel_values": mb.pixel_values.to(dtype, copy=True), "image_grid_thw": mb.image_grid_thw,
                  "packed_seq_params": packed_seq_params(mb.lengths, "torch", "cpu"),
                  "target_index": mb.target_index.clone()}
        hidden = model(**inputs)  # [N, h]: the targets' final hidden states
        loss, _ = grpo_microbatch_loss(hidden, module.output_weight(), _on_device(mb), scale, AlgoConfig(), 1.0,
                                       "triton", path, tp_group)
        del inputs, hidden  # as in the actor's schedule: what the graph did not save is freed after the forward
        gc.collect()  # reference cycles (gloo work objects, the Triton interpreter) would free tensors at random times
        after_forward = live.current
        if backward:
            loss.backward()
        del loss
    slots = packed_seq_params(mb.lengths, "torch", "cpu").segments.slots.numel()  # the padded SDPA's [n, max_len]
    return {"tokens": mb.num_tokens, "targets": mb.num_targets, "slots": slots, "grids": grids,
            "after_forward": after_forward, "peak": live.peak}


def measure_logprob_path(arch: QwenVLArch, tp: int, path: str, targets: int = 96, dtype: torch.dtype = torch.float32,
                         tp_group=None, seed: int = 0) -> dict:
    """Live bytes of the actor's log-prob path alone (`actor.losses.target_logprobs`, Triton kernels), from the
    targets' hidden states [targets, h] to their gradient and the output layer's weight gradient [V / tp, h]:
    after the forward and at the peak of forward + backward."""
    import gc

    from pebr_mega.actor.losses import target_logprobs
    from pebr_mega.actor.packing import ActorSequence, pack

    g = torch.Generator().manual_seed(seed)
    t = arch.text
    n_local = t.vocab_size // tp
    ids = torch.randint(0, t.vocab_size, (targets + 1,), generator=g).tolist()
    mb = pack([ActorSequence(ids, [0] + [1] * targets)], lambda tokens, grid: torch.zeros(3, len(tokens)))
    weight = torch.nn.Parameter((torch.randn(n_local, t.hidden_size, generator=g) * 0.02).to(dtype))
    live = LiveBytes()
    with live:
        hidden = torch.randn(targets, t.hidden_size, generator=g).to(dtype).requires_grad_()
        base = live.current
        lp, ent = target_logprobs(hidden, weight, mb, 1.0, "triton", path, tp_group, with_entropy=True)
        loss = lp.sum() + 0.1 * ent.sum()
        gc.collect()  # the Triton interpreter leaves reference cycles that hold a chunk until the next collection
        after_forward = live.current - base
        # Gradients returned, not accumulated: a leaf's AccumulateGrad clones a gradient that something else
        # still references (a gloo work object, at random), which the actor's non-leaf hidden states never do.
        grads = torch.autograd.grad(loss, [hidden, weight])
        del loss, lp, ent, grads
    return {"targets": targets, "after_forward": after_forward, "peak": live.peak - base}
