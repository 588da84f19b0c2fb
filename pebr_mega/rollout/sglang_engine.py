"""The SGLang rollout engine: SGLang's offline `Engine`, colocated with training, one per rollout-TP group.

In a torchrun job of W ranks with rollout TP size t, ranks [g*t, (g+1)*t) form rollout group g; its first
rank owns an `sglang.Engine(tp_size=t, base_gpu_id=<its GPU>)` whose t scheduler processes run on the
group's t GPUs, beside the training processes. Every rank calls `generate` with the same requests: each
group answers a contiguous share, and the answers are all-gathered so every rank returns the full list.

Written against SGLang's source and docs (see docs/ROLLOUT.md, "What has been executed where"); it has not
run on a GPU yet. The pure translation functions are unit-tested on CPU, and the collective side (the gloo
group, the all-gathers, the failure agreement) at world size 2 over gloo with a stand-in for `sglang.Engine`.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from pebr_mega.errors import BackendUnavailableError, CheckpointError, DataError, PebrError
from pebr_mega.rollout.engine import RolloutConfig, WeightBucket
from pebr_mega.rollout.types import RolloutRequest, Sample, SamplingParams
from pebr_mega.versions import require_in_window

INSTALL_HINT = 'pip install -e ".[gpu]"  # the sglang window of setup.py (docs/ROLLOUT.md says why)'
WEIGHTS = "weights"  # SGLang's memory tags (sglang/srt/constants.py)
KV_CACHE = "kv_cache"
OWNED_SERVER_ARGS = ("model_path", "tp_size", "base_gpu_id", "random_seed", "port")
# Inherited by SGLang's schedulers, these break them: torchrun's agent-store flag hangs their rendezvous,
# expandable segments disable the memory saver (see sglang_env_cleared).
ENV_UNSET_FOR_SGLANG = ("TORCHELASTIC_USE_AGENT_STORE", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# What SGLang's constructor sets in the trainer's own environment for good (`_set_envs_and_config` in
# srt/entrypoints/engine.py, 0.5.13 and 0.5.23): restored after it returns (see sglang_env_cleared).
# tests/rollout/test_sglang_contract.py checks that every NCCL_*/CUDA_* variable it writes is listed here.
ENV_SET_BY_SGLANG = ("CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_MODULE_LOADING", "NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE",
                     "NCCL_MNNVL_ENABLE", "NCCL_GRAPH_MIXING_SUPPORT")
SGLANG_PORT_BASE = 30000  # SGLang's default `port`; each engine on a node gets its own (see engine_port)
SGLANG_PORT_STRIDE = 100


@dataclass
class EngineOutput:
    """One generated response as it crosses ranks: plain data, no tensors."""

    record_id: str
    response_ids: list[int]
    response_text: str
    finish_reason: str
    logprobs: list[float]


# ---------------------------------------------------------------------------------------- layout (pure)
def rollout_group_count(world_size: int, tp_size: int) -> int:
    """Number of rollout groups: every `tp_size` consecutive ranks form one."""
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(f"rollout.sglang_tp_size={tp_size} must be >= 1 and divide the world size {world_size}")
    return world_size // tp_size


def shard_bounds(num_requests: int, num_groups: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) request ranges per group; the first `num_requests % num_groups` get one more."""
    base, extra = divmod(num_requests, num_groups)
    bounds, start = [], 0
    for g in range(num_groups):
        stop = start + base + (1 if g < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# ------------------------------------------------------------------------------ request translation (pure)
def sglang_sampling_params(sampling: SamplingParams, seed: int | None, n: int = 1) -> dict:
    """SGLang's per-request `sampling_params` dict, asking for `n` samples of the request (SGLang's own `n`).

    Temperature 0 is passed as is: SGLang turns it into top_k = 1 (greedy). `sampling_seed` only changes
    sampling with the server argument `enable_deterministic_inference`; the model's EOS ids always stop.
    """
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_new_tokens": sampling.max_new_tokens,
        "skip_special_tokens": True,
    }
    if n > 1:
        params["n"] = n
    if sampling.stop_token_ids:
        params["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
    if seed is not None:
        params["sampling_seed"] = int(seed)
    if sampling.banned_token_ids:
        # SGLang's OpenAI-style logit bias (token id as a string -> additive bias): effectively a ban.
        params["logit_bias"] = {str(int(t)): -1e4 for t in sampling.banned_token_ids}
    return params


def expand_image_pads(prompt_ids: Sequence[int], image_grid_thw: torch.Tensor | None, image_token_id: int,
                      merge_size: int, where: str = "prompt") -> list[int]:
    """Prompt ids with one image pad per merged vision token, as SGLang's `processor_output` path needs.

    With `processor_output` image data SGLang keeps our input_ids, finds each image at a contiguous run of
    pad tokens and builds M-RoPE positions from them, so each run must hold t*h*w/merge^2 pads. Runs that
    already have that length (our pipeline) pass through; a single pad per image is expanded.
    """
    ids = list(prompt_ids)
    runs: list[tuple[int, int]] = []  # (start, length) of each run of pads
    for i, tok in enumerate(ids):
        if tok == image_token_id:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    expected = [] if image_grid_thw is None else [int(t * h * w) // merge_size ** 2 for t, h, w in image_grid_thw.tolist()]
    if len(runs) != len(expected):
        raise DataError(f"{where}: {len(runs)} image-pad runs in the prompt but {len(expected)} images")
    if all(n == e for (_, n), e in zip(runs, expected)):
        return ids
    if all(n == 1 for _, n in runs):
        for (start, _), e in reversed(list(zip(runs, expected))):
            ids[start:start + 1] = [image_token_id] * e
        return ids
    raise DataError(f"{where}: image-pad runs of lengths {[n for _, n in runs]} match neither the expected "
                    f"{expected} nor one pad per image")


def processor_output(request: RolloutRequest) -> list:
    """The request's image data for SGLang: one `processor_output` dict holding all its images, or [None]."""
    if request.pixel_values is None:
        return [None]
    # SGLang accepts exactly one processor_output item per request; its tokenizer process ships it to the
    # scheduler by pickling, so host tensors are the safe form.
    return [{"format": "processor_output", "pixel_values": request.pixel_values.detach().cpu(),
             "image_grid_thw": request.image_grid_thw.detach().cpu()}]


def generate_inputs(shard: Sequence[RolloutRequest], sampling: SamplingParams, first_index: int,
                    image_token_id: int, merge_size: int, parallel_sampling: bool = True) -> dict:
    """Keyword arguments of `Engine.generate` for a shard; the outputs come n per request, request-major.

    `parallel_sampling` (the default): each request once, with SGLang's own `n`. SGLang's tokenizer manager
    then processes the request's image data once, prefills its prompt once (a max_new_tokens=0 request that
    fills the prefix cache) and sends n copies of the tokenized request, collecting the answers request by
    request (`TokenizerManager._handle_batch_request`, the `parallel_sample_num > 1` branch, 0.5.13 and
    0.5.23), so the order is ours. The n samples share one sampling-params dict, so they cannot get distinct
    `sampling_seed`s: none is sent for n > 1 (without `enable_deterministic_inference` SGLang ignores it).

    Otherwise each request is repeated n times and sample k of global request i gets seed
    `sampling.seed + i*n + k` (what deterministic inference needs for the samples to differ); n copies of
    the pixel values then go through SGLang's processor, the ViT and prefill.
    """
    n = sampling.n if parallel_sampling else 1
    copies = 1 if parallel_sampling else sampling.n
    input_ids, image_data, params = [], [], []
    for i, req in enumerate(shard):
        ids = expand_image_pads(req.prompt_ids, req.image_grid_thw, image_token_id, merge_size, f"record '{req.record_id}'")
        images = processor_output(req)
        for k in range(copies):
            seed = None if sampling.seed is None or n > 1 else sampling.seed + (first_index + i) * copies + k
            input_ids.append(ids)
            image_data.append(images)
            params.append(sglang_sampling_params(sampling, seed, n))
    has_images = any(item != [None] for item in image_data)
    return {"input_ids": input_ids, "image_data": image_data if has_images else None, "sampling_params": params}


# ------------------------------------------------------------------------------- output translation (pure)
def parse_output(out: dict, record_id: str, prompt_len: int | None = None) -> EngineOutput:
    """Read one `Engine.generate` result: ids and log-probs from meta_info.output_token_logprobs.

    SGLang appends the sampled stop token to the output and records its log-prob, but trims it from
    "text"; the ids taken from output_token_logprobs therefore include it, as the actor needs (it learns to
    stop). The log-probs are log softmax(logits / T) of the sampling step, before top-p/top-k.
    `prompt_len`, when given, must equal meta_info["prompt_tokens"]: some SGLang versions decode the given
    input_ids of a multimodal request and tokenize the text again, and a prompt that came out different
    would make the samples answers to a prompt the actor never sees.
    """
    meta = out["meta_info"]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type")
    if kind not in ("stop", "length"):
        raise PebrError(f"SGLang did not finish record '{record_id}': finish_reason={reason!r}")
    token_logprobs = meta.get("output_token_logprobs")
    if token_logprobs is None:
        raise PebrError(f"SGLang returned no output_token_logprobs for record '{record_id}'")
    used = meta.get("prompt_tokens")
    if prompt_len is not None and used is not None and int(used) != prompt_len:
        raise PebrError(f"record '{record_id}': SGLang generated from a prompt of {used} tokens, not the {prompt_len} "
                        "it was given (it re-tokenised the prompt); the samples would not match the training prompt")
    ids = [int(entry[1]) for entry in token_logprobs]
    logprobs = [float(entry[0]) for entry in token_logprobs]
    matched = reason.get("matched")
    if kind == "stop" and isinstance(matched, int) and (not ids or ids[-1] != matched):
        raise PebrError(f"record '{record_id}': SGLang stopped on token {matched} but it is not the last output token")
    return EngineOutput(record_id, ids, out.get("text", ""), kind, logprobs)


def regroup_outputs(requests: Sequence[RolloutRequest], n: int, bounds: Sequence[tuple[int, int]],
                    outputs_by_group: Sequence[Sequence[EngineOutput] | str | None]) -> list[Sample]:
    """Samples in request order (n per request) from each group's outputs (or error message) for its shard."""
    samples: list[Sample] = []
    for g, ((start, stop), outs) in enumerate(zip(bounds, outputs_by_group, strict=True)):
        if isinstance(outs, str):
            raise PebrError(f"rollout group {g} failed to generate: {outs}")
        if outs is None or len(outs) != (stop - start) * n:
            got = "none" if outs is None else len(outs)
            raise PebrError(f"rollout group {g} returned {got} outputs for {stop - start} requests x n={n}")
        for j, o in enumerate(outs):
            req = requests[start + j // n]
            if o.record_id != req.record_id:
                raise PebrError(f"rollout group {g} answered record '{o.record_id}' where this rank has "
                                f"'{req.record_id}': generate() must get the same requests on every rank")
            samples.append(Sample(request=req, index=j % n, response_ids=o.response_ids, response_text=o.response_text,
                                  finish_reason=o.finish_reason, rollout_logprobs=o.logprobs))
    return samples


def engine_port(gpu: int) -> int:
    """SGLang's `port` server argument for the engine whose first scheduler runs on local GPU `gpu`.

    Engines of different rollout groups on one node must not pick the same rendezvous port for their
    schedulers. SGLang 0.4/0.5 derived it as `port + random.randint(100, 1000)` (`PortArgs.init_new`,
    python/sglang/srt/server_args.py) from the trainer's own `random`, which every rank seeds alike; newer
    versions take a free port from the OS. A distinct `port` per GPU keeps the older derivation apart (verl
    gave each rank its own port for the same reason).
    """
    return SGLANG_PORT_BASE + SGLANG_PORT_STRIDE * gpu


def engine_server_args(model_dir: str | Path, tp_size: int, base_gpu_id: int, random_seed: int,
                       passthrough: dict | None) -> dict:
    """ServerArgs for `sglang.Engine`: SGLang's own names passed through, plus the five this engine owns."""
    passthrough = dict(passthrough or {})
    clash = sorted(set(passthrough) & set(OWNED_SERVER_ARGS))
    if clash:
        raise ValueError(f"rollout.sglang_args may not set {clash}: the SGLang engine derives them")
    # release/resume_memory only free memory with the memory saver on.
    args = {"enable_memory_saver": True, **passthrough}
    args.update(model_path=str(model_dir), tp_size=tp_size, base_gpu_id=base_gpu_id, random_seed=random_seed,
                port=engine_port(base_gpu_id))
    return args


def resume_phases(released: set[str], tags: Sequence[str] | None) -> list[list[str]]:
    """The `resume_memory_occupation` calls that take back `tags` (None: all released), weights first.

    Only released tags are resumed, so resuming twice is harmless (SGLang's scheduler removes each resumed
    tag from its set of offloaded tags and fails on one that is not there); the weights come in their own
    call before the rest (KV cache, CUDA graphs) because the weight sync runs between the two.
    """
    wanted = set(released) if tags is None else set(tags) & set(released)
    phases = [[WEIGHTS]] if WEIGHTS in wanted else []
    rest = sorted(wanted - {WEIGHTS})
    return phases + ([rest] if rest else [])


@contextlib.contextmanager
def sglang_env_cleared(names: Sequence[str] = ENV_UNSET_FOR_SGLANG) -> Iterator[None]:
    """Unset the environment variables `names` inside the block; put back what was there after it, also on error.

    SGLang's constructor spawns its scheduler processes, which inherit the trainer's environment; two kinds
    of variables there break them:

    - TORCHELASTIC_USE_AGENT_STORE=True, which torchrun's agent sets in every worker (torch
      distributed/elastic/agent/server/local_elastic_agent.py, `_start_workers`; the c10d and static
      rendezvous handlers report `use_agent_store` True). Each scheduler calls `init_process_group(
      "tcp://127.0.0.1:<port>", rank=tp_rank, world_size=tp_size)` (python/sglang/srt/distributed/
      parallel_state.py, `init_distributed_environment`); torch's tcp:// handler builds the store in
      `_create_c10d_store` (torch/distributed/rendezvous.py), which with `_torchelastic_use_agent_store()`
      true makes every rank, rank 0 included, a TCPStore *client* of a server nobody starts: the schedulers
      wait until the store times out. The other torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
      MASTER_ADDR/PORT, ...) are read only by the env:// handler or when local_rank is -1, neither of which
      the schedulers use, so they stay (verl's torchrun test of the SGLang engine removed only this one:
      tests/workers/rollout/utils_sglang.py `clean_torchelastic_env`).
    - PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF: with expandable segments torch_memory_saver refuses to
      work (fzyzcjy/torch_memory_saver#24), so `release_memory_occupation` would free nothing; slime removes
      both before it starts SGLang (slime/backends/sglang_utils/sglang_engine.py `launch_server_process`).

    The schedulers are started inside the constructor, so restoring afterwards is safe. The variables SGLang's
    constructor sets in this process (`ENV_SET_BY_SGLANG`: `CUDA_DEVICE_MAX_CONNECTIONS=8`, NCCL's cuMem and
    NVLS switches) are put back as well: only group owners build an engine, and the trainer's NCCL
    communicators, created lazily at their first collective, must see the same environment on every rank.
    """
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    kept = {name: os.environ.get(name) for name in ENV_SET_BY_SGLANG}
    try:
        yield
    finally:
        for name, value in [*((n, saved.get(n)) for n in names), *kept.items()]:
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_sglang_engine(sglang, server_args: dict):
    """`sglang.Engine(**server_args)` with the variables that break its schedulers unset (sglang_env_cleared)."""
    with sglang_env_cleared():
        return sglang.Engine(**server_args)


def require_sglang():
    """Import sglang and check for CUDA; raise BackendUnavailableError naming every missing piece."""
    reasons, sglang = [], None
    try:
        import sglang
    except (ImportError, OSError) as exc:
        reasons.append(f"the sglang package cannot be imported ({exc})")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device is visible (SGLang runs on NVIDIA GPUs only)")
    if reasons:
        raise BackendUnavailableError("rollout engine 'sglang' is unavailable: " + "; ".join(reasons) +
                                      f". Install it with: {INSTALL_HINT} (on a CUDA machine), or set rollout.engine=hf")
    require_in_window("sglang")  # e.g. 0.5.1-0.5.12 build text M-RoPE positions for our image requests
    return sglang


def sglang_memory_tags() -> list[str]:
    """The memory tags of the installed SGLang (python/sglang/srt/constants.py `GPU_MEMORY_ALL_TYPES`)."""
    try:  # newer versions add cuda_graph and weights_drafter to weights and kv_cache
        from sglang.srt.constants import GPU_MEMORY_ALL_TYPES
    except ImportError:
        return [WEIGHTS, KV_CACHE]
    return list(GPU_MEMORY_ALL_TYPES)


def sglang_ipc_helpers() -> tuple:
    """(serialize, LocalSerializedTensor) of the installed SGLang, as its own multi-producer weight helper uses
    them (srt/weight_sync/utils.py `update_weights`, 0.5.13 and 0.5.23): each producer serialises the tensors
    on its own GPU (`MultiprocessingSerializer.serialize`, after `monkey_patch_torch_reductions`, which
    names the device by UUID; process-wide, and nothing else in the trainer shares CUDA tensors between
    processes), and TP rank r's scheduler opens only `LocalSerializedTensor.values[r]`.
    The class moved between the window's ends; tests/rollout/test_sglang_contract.py checks both paths' versions.
    """
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    try:  # 0.5.23
        from sglang.srt.model_executor.model_runner_components.weight_updater import LocalSerializedTensor
    except ImportError:  # 0.5.13
        from sglang.srt.model_executor.model_runner import LocalSerializedTensor
    monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize, LocalSerializedTensor


def read_vision_ids(model_dir: str | Path) -> tuple[int, int]:
    """(image pad token id, spatial merge size) from the model's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
        return int(cfg["image_token_id"]), int(cfg["vision_config"]["spatial_merge_size"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read image_token_id / vision_config.spatial_merge_size ({exc})") from exc


def _per_rank_named_tensors(members: Sequence[list | str], local_serialized_tensor) -> list:
    """[(name, LocalSerializedTensor(values=[rank 0's payload, rank 1's, ...]))] from each member's
    [(name, payload)] (or its error message); every member must have sent the same names in the same order."""
    failed = [m for m in members if isinstance(m, str)]
    if failed:
        raise PebrError(f"serialising a weight bucket failed: {failed[0]}")
    names = [name for name, _ in members[0]]
    for r, member in enumerate(members):
        if [name for name, _ in member] != names:
            raise PebrError(f"TP rank {r} of the rollout group sent other weights than rank 0 ({names[:3]}...)")
    return [(name, local_serialized_tensor(values=[member[j][1] for member in members]))
            for j, name in enumerate(names)]


def _call_reporting(call, what: str) -> Exception | None:
    """Run an Engine call that answers `(success, message)`; the failure (raised or reported) as an exception.

    `Engine.begin_weight_update()` / `end_weight_update()` (SGLang 0.5.21+; srt/entrypoints/engine.py) return
    the tokenizer manager's `Tuple[bool, str]` (`tokenizer_control_mixin.py`, 0.5.23); a session already open,
    or none to close, comes back as success False, not as an exception.
    """
    try:
        result = call()
    except Exception as exc:
        return exc
    if isinstance(result, tuple) and result and result[0] is False:
        return PebrError(f"SGLang refused {what}(): {result[1] if len(result) > 1 else ''}")
    return None


# ------------------------------------------------------------------------------------------ collectives
class RolloutGroups:
    """The engine's collective side: the rollout-group layout, and one gloo group for its object
    all-gathers and barriers, created once (collectively: every rank constructs it, in the same order).

    Why gloo: on the default NCCL group `all_gather_object` pickles into CUDA tensors and `barrier` runs a
    kernel, on GPUs that the SGLang schedulers of the rank's group use at the same time. slime keeps a gloo
    group for this (slime/utils/distributed_utils.py `init_gloo_group`, used by its weight updater's
    barriers), and SGLang's own `GroupCoordinator.all_gather_object` uses its CPU group
    (python/sglang/srt/distributed/parallel_state.py).
    """

    def __init__(self, tp_size: int) -> None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialized else 0
        self.world_size = dist.get_world_size() if initialized else 1
        self.tp_size = tp_size
        self.num_groups = rollout_group_count(self.world_size, tp_size)
        self.group = self.rank // tp_size
        self.is_owner = self.rank % tp_size == 0
        self.cpu_group = dist.new_group(backend="gloo") if self.world_size > 1 else None

    def gather_from_owners(self, mine: Any) -> list:
        """Every group owner's `mine`, in group order, on every rank (other ranks' values are dropped)."""
        if self.world_size == 1:
            return [mine]
        everyone: list = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine, group=self.cpu_group)
        return [everyone[g * self.tp_size] for g in range(self.num_groups)]

    def agree(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank if `what` failed on any rank; otherwise a barrier.

        The rank that failed raises its own exception; the others raise a PebrError naming it, so no rank
        is left waiting in the next collective.
        """
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list = [None] * self.world_size
        torch.distributed.all_gather_object(messages, message, group=self.cpu_group)
        if error is not None:
            raise error
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed:
            rank, m = failed[0]
            raise PebrError(f"{what} failed on rank {rank}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
                            + f": {m}")

    def barrier(self) -> None:
        """Wait for every rank of the job, over the gloo group."""
        if self.world_size > 1:
            torch.distributed.barrier(group=self.cpu_group)

    def gather_in_group(self, mine: Any) -> list | None:
        """On a group's owner, every member's `mine` in TP-rank order; None on the other ranks (collective)."""
        if self.world_size == 1:
            return [mine]
        everyone: list = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine, group=self.cpu_group)
        first = self.group * self.tp_size
        return everyone[first:first + self.tp_size] if self.is_owner else None


# ------------------------------------------------------------------------------------------------ engine
class SGLangRolloutEngine:
    """`RolloutEngine` over SGLang's offline Engine; construct it on every rank of the job."""

    def __init__(self, model_dir: str | Path, tp_size: int = 1, server_args: dict | None = None,
                 base_gpu_id: int | None = None, seed: int = 0) -> None:
        groups = RolloutGroups(tp_size)  # collective: before anything can fail on one rank only
        engine, gpu, tags, ipc, error = None, None, [WEIGHTS, KV_CACHE], None, None
        try:
            sglang = require_sglang()
            image_token_id, merge_size = read_vision_ids(model_dir)
            if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true"):
                raise PebrError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would return log-probs before "
                                "temperature, which the actor does not compare against; unset it")
            if groups.is_owner:
                gpu = torch.cuda.current_device() if base_gpu_id is None else base_gpu_id
                # In a job, a group's GPUs are its ranks' GPUs only if groups do not straddle nodes.
                if (groups.world_size > 1 and gpu % tp_size) or gpu + tp_size > torch.cuda.device_count():
                    raise ValueError(f"rank {groups.rank}: a rollout TP group of {tp_size} from GPU {gpu} does not fit "
                                     f"the {torch.cuda.device_count()} local GPUs; sglang_tp_size must divide GPUs per node")
                tags = sglang_memory_tags()
            if tp_size > 1:  # every member serialises its own copy of each bucket (update_weights)
                ipc = sglang_ipc_helpers()
            if groups.is_owner:
                engine = start_sglang_engine(sglang, engine_server_args(model_dir, tp_size, gpu, seed + groups.group,
                                                                        server_args))
        except Exception as exc:
            error = exc
        groups.agree(error, "starting the SGLang engine")
        # Deterministic inference seeds each sample; SGLang's `n` shares one seed (see generate_inputs).
        parallel = not (server_args or {}).get("enable_deterministic_inference", False)
        self._attach(groups, engine, image_token_id, merge_size, tags, gpu, parallel_sampling=parallel, ipc=ipc)

    def _attach(self, groups: RolloutGroups, engine, image_token_id: int, merge_size: int,
                memory_tags: Sequence[str], gpu: int | None, parallel_sampling: bool = True,
                ipc: tuple | None = None) -> None:
        # The state every method uses; the constructor's only product (tests attach a stand-in Engine here).
        self._groups = groups
        self.rank, self.world_size, self.tp_size = groups.rank, groups.world_size, groups.tp_size
        self.num_groups, self.group = groups.num_groups, groups.group
        self.engine = engine
        self.image_token_id, self.merge_size = image_token_id, merge_size
        self._memory_tags = list(memory_tags)
        self._released: set[str] = set()
        self.gpu = gpu
        self.parallel_sampling = parallel_sampling
        self._ipc = ipc  # (serialize, LocalSerializedTensor) at rollout TP > 1 (sglang_ipc_helpers)
        self._shut_down = False

    @classmethod
    def from_config(cls, model_dir: str | Path, cfg: RolloutConfig, seed: int = 0) -> "SGLangRolloutEngine":
        """Build from the rollout config section (`sglang_tp_size`, `sglang_args`)."""
        return cls(model_dir, tp_size=cfg.sglang_tp_size, server_args=cfg.sglang_args, seed=seed)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Sample]:
        """n samples per request, grouped, in request order, on every rank (call it on all ranks)."""
        sampling.validate()
        self._require_resident("generate", self._released)
        bounds = shard_bounds(len(requests), self.num_groups)
        mine: list[EngineOutput] | str | None = None
        if self.engine is not None:
            start, stop = bounds[self.group]
            try:
                mine = self._generate_shard(requests[start:stop], sampling, start)
            except Exception as exc:
                if self.world_size == 1:
                    raise
                # Sent to every rank instead of raising here, so no rank waits forever in the all-gather.
                mine = f"{type(exc).__name__}: {exc}"
        return regroup_outputs(requests, sampling.n, bounds, self._groups.gather_from_owners(mine))

    def _generate_shard(self, shard: Sequence[RolloutRequest], sampling: SamplingParams, first: int) -> list[EngineOutput]:
        if not shard:
            return []
        inputs = generate_inputs(shard, sampling, first, self.image_token_id, self.merge_size, self.parallel_sampling)
        outs = self.engine.generate(**inputs, return_logprob=True)
        # Both forms answer n per request, request-major (generate_inputs); the prompt each answer came from:
        per_entry = sampling.n if self.parallel_sampling else 1
        prompt_lens = [len(ids) for ids in inputs["input_ids"] for _ in range(per_entry)]
        record_ids = [r.record_id for r in shard for _ in range(sampling.n)]
        return [parse_output(o, rid, n) for o, rid, n in zip(outs, record_ids, prompt_lens, strict=True)]

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load (HF checkpoint name, full tensor) buckets, then flush the prefix cache once.

        Every rank iterates all the buckets (the sync path runs collectives while producing them), also after
        a failure on an owner, which is reported to every rank at the end. Owners pass each bucket to SGLang,
        which shares the tensors with its TP schedulers by CUDA-IPC handle; a bucket is dropped as soon as
        its call returns, before the next one is produced (docs/ROLLOUT.md, "Weight buckets: how long they
        live").
        """
        self._require_resident("update_weights", self._released & {WEIGHTS})
        error: Exception | None = None
        session = self.engine is not None and hasattr(self.engine, "begin_weight_update")
        if session:
            error = _call_reporting(self.engine.begin_weight_update, "begin_weight_update")
        for bucket in buckets:
            if self.tp_size > 1:
                error = self._load_bucket_per_rank(bucket, error)
            elif self.engine is not None and error is None:
                try:
                    self._load_bucket(bucket)
                except Exception as exc:
                    error = exc
            del bucket  # one bucket alive at a time: the generator builds the next one after this
        if session:
            # Closed also after a failed bucket: a session left open refuses the next begin_weight_update.
            closed = _call_reporting(self.engine.end_weight_update, "end_weight_update")
            error = error or closed
        if self.engine is not None and error is None:
            try:
                result = self.engine.flush_cache()  # cached prefixes were computed with the old weights
                if getattr(result, "success", True) is False:
                    raise PebrError("SGLang did not flush its prefix cache after the weight update (requests running?)")
            except Exception as exc:
                error = exc
        if (self.engine is not None or self.tp_size > 1) and torch.cuda.is_available():
            # Shared blocks whose consumers released them late wait in torch's IPC limbo, outside the caching
            # allocator; hand them back before the trainer empties the cache.
            torch.cuda.ipc_collect()
        self._groups.agree(error, "the SGLang weight update")

    def _load_bucket(self, bucket: WeightBucket) -> None:
        # In newer SGLang (read: 0.5.23; 0.5.21 per issue 22) this must run inside begin_weight_update() /
        # end_weight_update(): the scheduler's WeightUpdater.update_weights_from_tensor answers success=False
        # outside a session (srt/managers/scheduler_components/weight_updater.py); update_weights opens it.
        # SGLang's colocated path shares CUDA tensors by IPC handle; host tensors are moved to our GPU (an
        # owner always has one; `gpu` is None only for an engine attached without a device, as in the tests).
        self._send_bucket([(name, t if t.is_cuda or self.gpu is None else t.to(f"cuda:{self.gpu}"))
                           for name, t in bucket])

    def _send_bucket(self, named: list) -> None:
        """One bucket into the engine (the cache is flushed once, after the last); `CheckpointError` when refused."""
        ok, message = self.engine.update_weights_from_tensor(named_tensors=named, flush_cache=False)
        if not ok:
            raise CheckpointError(f"SGLang rejected a weight bucket ({[n for n, _ in named][:3]}...): {message}")

    def _load_bucket_per_rank(self, bucket: WeightBucket, error: Exception | None) -> Exception | None:
        """Rollout TP > 1: each rank of the group hands over its own copy of the bucket (collective).

        Every rank holds the whole bucket on its own GPU (the sync all-gathers), which is rank r's scheduler's
        GPU; passing the owner's tensors instead would make schedulers 1..t-1 open handles to the owner's GPU
        (a CUDA context there each, and reads across GPUs): `Engine.update_weights_from_tensor` serialises
        plain tensors once per TP rank (srt/entrypoints/engine.py). So every member serialises its bucket,
        the owner collects them over gloo and passes one `LocalSerializedTensor` per name, and every member
        keeps its bucket until the owner's call (its schedulers' copies and TP barrier) has returned, as
        slime does (`_send_to_colocated_engine` in slime/backends/megatron_utils/update_weight/
        update_weight_from_tensor.py). Returns the first error (the owner's), reported by update_weights.
        """
        payload: list | str
        try:
            serialize = self._ipc[0]
            payload = [(name, serialize(t.detach())) for name, t in bucket]
        except Exception as exc:  # still sent: the gather is collective
            payload = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        members = self._groups.gather_in_group(payload)
        if self.engine is not None and error is None:
            try:
                self._send_bucket(_per_rank_named_tensors(members, self._ipc[1]))
            except Exception as exc:
                error = exc
        self._groups.barrier()
        return error

    def release_memory(self) -> None:
        """Release all of SGLang's GPU memory (weights, KV cache, CUDA graphs) so training can use it.

        The weights are discarded, not parked (SGLang's scheduler stashes only the model's buffers): they
        must be synced again after `resume_memory`, unless `enable_weights_cpu_backup` is in `sglang_args`.
        """
        self._require_resident("release_memory", set())
        held = [t for t in self._memory_tags if t not in self._released]
        error = None
        if self.engine is not None and held:
            try:
                self.engine.release_memory_occupation(tags=held)
            except Exception as exc:
                error = exc
        self._groups.agree(error, "releasing SGLang's memory")
        self._released = set(self._memory_tags)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back the released memory named by `tags` (default: all of it, weights first).

        The trainer splits it: `resume_memory([WEIGHTS])` -> `update_weights` -> `resume_memory()`, so the KV
        cache is only allocated once the sync buffers are gone. Resumed weights hold garbage until
        `update_weights` runs (unless SGLang's `enable_weights_cpu_backup` is passed).
        """
        self._require_resident("resume_memory", set())
        phases = resume_phases(self._released, tags)
        error = None
        if self.engine is not None:
            try:
                for phase in phases:
                    self.engine.resume_memory_occupation(tags=phase)
            except Exception as exc:
                error = exc
        self._groups.agree(error, "resuming SGLang's memory")
        for phase in phases:
            self._released -= set(phase)

    def shutdown(self) -> None:
        """Stop SGLang's subprocesses (all of the engine's GPU memory goes with them); later calls are errors.

        Not collective: every rank calls it at the end of a stage (EngineLifecycle.close), but also from a
        `finally` while another rank may be inside a training collective after an error on this one; a
        gather here would then hang instead of letting the launcher end the job. An owner's failure to stop
        its engine is raised on that rank."""
        self._shut_down = True
        if self.engine is not None:
            try:
                self.engine.shutdown()
            finally:
                self.engine = None

    def _require_resident(self, what: str, released: set[str]) -> None:
        # The same state on every rank, so all ranks raise together rather than some waiting in a collective.
        if self._shut_down:
            raise PebrError(f"{what}() after the SGLang engine was shut down")
        if released:
            raise PebrError(f"{what}() while SGLang's {sorted(released)} memory is released: call resume_memory() first")
