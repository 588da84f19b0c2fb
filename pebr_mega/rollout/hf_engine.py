"""The transformers rollout engine: batched `generate`, n samples per prompt, on CPU or GPU.

It is the CPU backend of the rollout contract (tests, the embedded demo) and a reference for the SGLang
engine. Weights arrive through `update_weights` as (HF checkpoint name, tensor) buckets, exactly as the
SGLang engine receives them, so the weight-sync path is exercised without a disk round trip.

It enforces the rollout contract as strictly as SGLang (`pebr_mega.rollout.engine.RolloutEngine`):
`release_memory()` frees every parameter's storage (each becomes an empty tensor; its shape and dtype are
remembered), `resume_memory(["weights"])` reallocates them with undefined contents, `update_weights` fills
them, and `generate` refuses to run while memory is released or before every parameter has been delivered
again, naming the missing ones. A tied `lm_head` is the embedding's parameter: it comes back with
`model.embed_tokens.weight`, the only name the checkpoint (and the weight sync) gives it.

Per-token log-probs are those of the sampling distribution before top-p/top-k truncation,
log softmax(logits / temperature), which is what the actor recomputes; their ratio to the actor's is the
train-inference mismatch metric.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Sequence

import torch

from pebr_mega.errors import CheckpointError, PebrError
from pebr_mega.rollout.engine import KV_CACHE, WEIGHTS, WeightBucket
from pebr_mega.rollout.types import RolloutRequest, Sample, SamplingParams


def checkpoint_to_module_name(name: str, module_names: set[str]) -> str | None:
    """Map an HF checkpoint tensor name to the parameter name of the loaded transformers model.

    Checkpoints (and SGLang) use `model.layers.*`, `model.embed_tokens`, `visual.*`, `lm_head`; transformers
    >= 4.52 nests the modules as `model.language_model.*` and `model.visual.*`. Both layouts are accepted.
    """
    candidates = [name]
    if name.startswith("visual."):
        candidates.append("model." + name)
    elif name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        candidates.append("model.language_model." + name[len("model."):])
    for c in candidates:
        if c in module_names:
            return c
    return None


class HFRolloutEngine:
    """`RolloutEngine` over transformers' `Qwen2_5_VLForConditionalGeneration.generate`."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.token_types = mm_token_types_supported(self.model)
        # named_parameters lists a tied lm_head once, as the embedding it shares.
        self._params = dict(self.model.named_parameters())
        self._buffers = {k: v for k, v in self.model.named_buffers() if k not in self._params}
        self._layout = {name: (p.shape, p.dtype) for name, p in self._params.items()}
        self._released: set[str] = set()
        self._missing: set[str] = set()  # parameters without weights since the last release
        self.is_shut_down = False  # after shutdown() every call is refused, as SGLang's engine is gone

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        batch_size: int = 64) -> "HFRolloutEngine":
        """Load model and tokenizer from an HF directory."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(model_dir), device=device, batch_size=batch_size)

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Sample]:
        """n samples per request, grouped by request, in request order; deterministic for `sampling.seed`."""
        sampling.validate()
        self._require_weights("generate")
        samples: list[Sample] = []
        for start in range(0, len(requests), self.batch_size):
            batch = list(requests[start:start + self.batch_size])
            seed = None if sampling.seed is None else sampling.seed + start
            samples.extend(self._generate_batch(batch, sampling, seed))
        return samples

    def _generate_batch(self, batch: list[RolloutRequest], sampling: SamplingParams, seed: int | None) -> list[Sample]:
        inputs = self._collate(batch)
        stop_ids = list(sampling.stop_token_ids) or [self.tokenizer.eos_token_id]
        greedy = sampling.temperature == 0
        kwargs = dict(
            do_sample=not greedy,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=stop_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        if sampling.banned_token_ids:
            kwargs["suppress_tokens"] = list(sampling.banned_token_ids)
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else 0)
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng if seed is not None else contextlib.nullcontext(), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:]
        # logits: one [B*n, V] tensor per generated position.
        logits = torch.stack(out.logits, dim=1).float() if out.logits else None
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        samples = []
        for row in range(new_tokens.shape[0]):
            req = batch[row // sampling.n]
            ids, reason = _cut_at_stop(new_tokens[row].tolist(), set(stop_ids))
            lps = None
            if logits is not None and ids:
                lp = torch.log_softmax(logits[row, : len(ids)] / temperature, dim=-1)
                lps = lp.gather(-1, torch.tensor(ids, device=lp.device)[:, None]).squeeze(-1).tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(request=req, index=row % sampling.n, response_ids=ids, response_text=text,
                                  finish_reason=reason, rollout_logprobs=lps))
        return samples

    def _collate(self, batch: list[RolloutRequest]) -> dict:
        """Left-pad prompts (generation appends on the right) and concatenate the images of the batch."""
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.token_types:
            inputs["mm_token_type_ids"] = mm_token_type_ids(ids, self.model.config).to(self.device)
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in batch if r.image_grid_thw is not None]).to(self.device)
        return inputs

    # ------------------------------------------------------------------------------------------ weights
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Copy each (HF checkpoint name, tensor) into the live model; unknown names or shapes are errors.

        Refused while the weights' memory is released (`resume_memory(["weights"])` first, as SGLang requires).
        """
        self._require_running("update_weights")
        if WEIGHTS in self._released:
            raise PebrError("update_weights() while the rollout engine's weight memory is released: "
                            "call resume_memory(['weights']) first")
        names = set(self._params) | set(self._buffers)
        with torch.no_grad():
            for bucket in buckets:
                for hf_name, tensor in bucket:
                    target = checkpoint_to_module_name(hf_name, names)
                    if target is None:
                        raise CheckpointError(f"weight '{hf_name}' has no parameter in the rollout model")
                    param = self._params.get(target, self._buffers.get(target))
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise CheckpointError(f"weight '{hf_name}': shape {tuple(tensor.shape)} does not match "
                                              f"the rollout model's {tuple(param.shape)}")
                    param.copy_(tensor.to(param.device, param.dtype))
                    self._missing.discard(target)

    def release_memory(self) -> None:
        """Free every parameter's storage (shapes remembered) and the KV cache: the weights are gone.

        There is no KV pool between `generate` calls here, so only the bookkeeping of that tag changes.
        """
        self._require_running("release_memory")
        for param in self._params.values():
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        self._missing = set(self._params)
        self._released = {WEIGHTS, KV_CACHE}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back the released memory of `tags` (None: all). Resumed weights hold undefined values until
        `update_weights` delivers them."""
        self._require_running("resume_memory")
        wanted = set(self._released) if tags is None else set(tags) & self._released
        if WEIGHTS in wanted:
            for name in self._missing:
                shape, dtype = self._layout[name]
                self._params[name].data = torch.empty(shape, dtype=dtype, device=self.device)
        self._released -= wanted

    def shutdown(self) -> None:
        """Free the model (its parameters' and buffers' storage) for good; every later call is an error.

        SGLang's `Engine.shutdown()` stops the schedulers, which frees all of the engine's GPU memory; the
        pipeline shuts each stage's engine down before the next stage builds its own (EngineLifecycle.close).
        """
        for tensor in [*self._params.values(), *self._buffers.values()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=self.device)
        self.is_shut_down = True  # the allocator cache is freed by its one owner, EngineLifecycle.close

    def _require_running(self, what: str) -> None:
        if self.is_shut_down:
            raise PebrError(f"{what}() after the rollout engine was shut down")

    def _require_weights(self, what: str) -> None:
        self._require_running(what)
        if self._released:
            raise PebrError(f"{what}() while the rollout engine's {sorted(self._released)} memory is released: "
                            "call resume_memory() first")
        if self._missing:
            names = sorted(module_to_checkpoint_name(n) for n in self._missing)
            raise PebrError(f"{what}() before every weight was restored since release_memory(): {len(names)} of "
                            f"{len(self._params)} parameters have none (e.g. {', '.join(names[:3])}); push them "
                            f"with update_weights() (the trainer's EngineLifecycle syncs them from the actor)")


def module_to_checkpoint_name(name: str) -> str:
    """The HF checkpoint name of a transformers module parameter (the inverse of `checkpoint_to_module_name`)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def mm_token_types_supported(model) -> bool:
    """Whether this transformers version's Qwen2.5-VL takes `mm_token_type_ids` (5.x does)."""
    import inspect

    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def mm_token_type_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """0 for text, 1 for image-pad, 2 for video-pad tokens.

    transformers 5.x builds the 3-D M-RoPE positions only when it is given these types; without them it falls
    back to 1-D positions for every token, which is not the model the actor trains (nor the released one).
    """
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Keep tokens up to and including the first stop token (the actor learns to stop)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1], "stop"
    return ids, "length"
