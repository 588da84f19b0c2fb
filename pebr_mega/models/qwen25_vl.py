"""Qwen2.5-VL on Megatron-Core: a `GPTModel` decoder with M-RoPE, fed by a replicated vision tower.

Mapping onto Megatron:
- decoder: `GPTModel(position_embedding_type="mrope")` with GQA (`num_query_groups`), qkv bias
  (`add_qkv_bias`), SwiGLU (`gated_linear_unit` + silu), RMSNorm, tied or untied output layer
  (`share_embeddings_and_output_weights`), layers split over pipeline stages;
- vision: `VisionTower` (plain torch, `pebr_mega.models.vision`) on the first pipeline stage only,
  replicated on every TP rank (see that module for why), its grads averaged over TP by Megatron;
- merge: on the first stage the token embeddings are computed by GPTModel's own embedding, the image
  embeddings are written into the `<|image_pad|>` positions, and the result is passed as `decoder_input`;
- positions: 3-D M-RoPE ids [3, b, s] (`pebr_mega.models.rope_index`) are given to every stage, since each
  stage applies the rotary embedding in its own layers;
- output: logits from GPTModel's output layer, or (with `target_index`) only the final hidden states of the
  positions whose next token is trained: the output layer is then applied by the loss, to those rows only
  (`output_weight()`), so no `[tokens, vocab / tp]` logits of prompt tokens are ever made.

`build_model(arch, cfg, pre_process, post_process, vp_stage)` is Megatron's model-provider contract: it builds
this rank's pipeline stage.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from pebr_mega.models.arch import QwenVLArch
from pebr_mega.models.config import ModelConfig
from pebr_mega.models.attention import check_backend
from pebr_mega.models.specs import block_spec, resolve_spec
from pebr_mega.models.vision import VisionTower


def _pipeline_split(num_layers: int, pp: int) -> dict:
    """Megatron needs explicit first/last stage sizes when layers do not divide evenly over stages.

    With base = L // pp and rem = L % pp, the last stage takes base + rem layers and the others base each
    (the first stage already carries the vision tower and the embedding).
    """
    if pp == 1 or num_layers % pp == 0:
        return {}
    base, rem = divmod(num_layers, pp)
    if base == 0:
        raise ValueError(f"{num_layers} decoder layers cannot fill {pp} pipeline stages")
    return {"num_layers_in_first_pipeline_stage": base, "num_layers_in_last_pipeline_stage": base + rem}


def transformer_config(arch: QwenVLArch, cfg: ModelConfig, perform_initialization: bool = False,
                       use_cpu_initialization: bool | None = None):
    """The Megatron `TransformerConfig` of the Qwen2 decoder for this build configuration.

    `use_cpu_initialization` (default: when CUDA is absent) makes Megatron allocate parameters on CPU.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    t = arch.text
    resolve_spec(cfg.spec, cfg.fp8)  # fail at start-up when the backend cannot load (or FP8 would be ignored)
    if t.num_kv_heads % cfg.tp:
        raise ValueError(f"model.tp={cfg.tp} must divide the {t.num_kv_heads} key/value heads")
    if t.vocab_size % cfg.tp:
        raise ValueError(f"model.tp={cfg.tp} must divide the vocabulary size {t.vocab_size}")
    dtype = cfg.torch_dtype
    cuda = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not cuda
    recompute = None if cfg.recompute_granularity == "none" else cfg.recompute_granularity
    return TransformerConfig(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.intermediate_size,
        num_attention_heads=t.num_heads,
        num_query_groups=t.num_kv_heads,
        kv_channels=t.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(t.mrope_section),
        rotary_interleaved=False,
        # TE's fused RoPE does not handle M-RoPE with batch > 1; the unfused path is exact everywhere.
        apply_rope_fusion=False,
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=None if cfg.fp8 == "none" else cfg.fp8,
        # FP8 delayed scaling all-reduces amax over TP x DP (Megatron's default group). That needs the same
        # number of forwards on every DP rank, which the actor's packer guarantees (equal micro-batch
        # counts); it keeps every replica's scaling factors identical (docs/MODEL.md, "FP8 and DP").
        tp_only_amax_red=False,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        init_method_std=0.02,
        # Sequence lengths vary per micro-batch (images, packing). Megatron rejects that flag with its default
        # MoE dispatcher even for dense models, so name the (unused) dispatcher that accepts it.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        recompute_granularity=recompute,
        recompute_method=cfg.recompute_method if recompute == "full" else None,
        recompute_num_layers=cfg.recompute_num_layers if recompute == "full" else None,
        **_pipeline_split(t.num_layers, cfg.pp),
    )


class Qwen25VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL (the whole model when pp == 1).

    `forward(input_ids [b, s], position_ids [3, b, s], attention_mask=None, pixel_values=None,
    image_grid_thw=None, labels=None, packed_seq_params=None, target_index=None)` returns on the last stage
    logits [b, s, vocab / tp] (vocab-parallel unless `runtime_gather_output`), the per-token loss [b, s] when
    `labels` are given, or, with `target_index` (long [n], flat indices into the [s, b] positions), the
    final hidden states of those positions [n, h], whole on every TP rank (gathered from the
    sequence-parallel region); other stages return the hidden states [s, b, h].
    """

    def __init__(self, config, arch: QwenVLArch, spec: str, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None, parallel_output: bool = True, vision_recompute: bool = False,
                 attention: str = "auto") -> None:
        from megatron.core.models.gpt import GPTModel

        from megatron.core.transformer.enums import ModelType

        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.arch = arch
        self.spec = spec
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision_model: VisionTower | None = None
        if pre_process:
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            self.vision_model = VisionTower(arch.vision, recompute=vision_recompute, attention=attention).to(
                device=device, dtype=config.params_dtype)
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(spec, config, attention, vp_stage),
            vocab_size=arch.text.vocab_size,
            max_sequence_length=arch.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=arch.text.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=arch.text.rope_theta,
            # Image embeddings are merged first; the merged sequence is scattered for SP afterwards.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        if self.vision_model is not None and config.perform_initialization:
            self._init_vision(config.init_method)

    def _init_vision(self, init) -> None:
        """Random init of the tower (only used when training from scratch, e.g. the benchmark)."""
        for name, p in self.vision_model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
                torch.nn.init.ones_(p)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)
            else:
                init(p)

    # ------------------------------------------------------------------------------------ Megatron hooks
    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations here."""
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by Megatron's `finalize_model_grads` to all-reduce a tied embedding's grads over PP stages."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied embedding / output weight of this stage (Megatron's `finalize_model_grads` reduces it)."""
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's distributed-checkpoint view: GPTModel's own, plus the tower replicated over TP."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        sd = self.language_model.sharded_state_dict(f"{prefix}language_model.", sharded_offsets, metadata)
        if self.vision_model is not None:
            # Replicated over TP: the TP rank goes into replica_id, so only TP rank 0 writes the tower.
            sd.update(sharded_state_dict_default(self.vision_model, f"{prefix}vision_model.", sharded_offsets, metadata,
                                                 tp_group=self.language_model.pg_collection.tp))
        return sd

    def global_name(self, name: str) -> str:
        """Parameter name with this stage's local decoder-layer index replaced by the global one."""
        key = "language_model.decoder.layers."
        if not name.startswith(key):
            return name
        local, rest = name[len(key):].split(".", 1)
        layer = self.language_model.decoder.layers[int(local)]
        return f"{key}{layer.layer_number - 1}.{rest}"

    # ------------------------------------------------------------------------------------------- forward
    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """Token embeddings [s, b, h] with the image embeddings written into the image-pad positions."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image = self.vision_model(pixel_values, image_grid_thw).to(emb.dtype)
            mask = input_ids == self.arch.image_token_id  # [b, s]
            if mask.is_cuda:  # checked on the device: no host sync
                torch._assert_async(mask.sum() == image.shape[0], "<|image_pad|> tokens != image embeddings")
            elif int(mask.sum()) != image.shape[0]:
                raise ValueError(f"{int(mask.sum())} <|image_pad|> tokens but the images give {image.shape[0]} embeddings")
            # Fill in batch-major order (row 0's images first), the order in which the processor lays them out.
            emb = emb.transpose(0, 1).masked_scatter(mask[..., None], image).transpose(0, 1)
        if self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb.contiguous()

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                labels: Tensor | None = None, packed_seq_params=None,
                runtime_gather_output: bool | None = None, target_index: Tensor | None = None) -> Tensor:
        if packed_seq_params is not None and self.spec == "local":
            raise ValueError("packed sequences need the torch or te spec (Megatron's local attention has no THD path)")
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        if labels is not None:
            # The loss is computed on vocab-parallel logits (Megatron's cross entropy edits them in place).
            runtime_gather_output = None
        kwargs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      decoder_input=decoder_input, labels=labels, packed_seq_params=packed_seq_params,
                      runtime_gather_output=runtime_gather_output)
        if target_index is None or not self.post_process:
            return self.language_model(**kwargs)
        if labels is not None:
            raise ValueError("give labels (per-token loss over every position) or target_index, not both")
        with self._decoder_only():
            hidden = self.language_model(**kwargs)  # [s, b, h] after the final norm ([s / tp, b, h] with SP)
        return self.target_hidden(hidden, target_index)

    @contextmanager
    def _decoder_only(self):
        """GPTModel's forward without its output layer: `_postprocess` returns the decoder's (final-normed)
        hidden states when `post_process` is off (megatron/core/models/gpt/gpt_model.py, 0.16 to 0.20)."""
        self.language_model.post_process = False
        try:
            yield
        finally:
            self.language_model.post_process = True

    def target_hidden(self, hidden: Tensor, target_index: Tensor) -> Tensor:
        """Rows `target_index` of the [s, b] positions of `hidden`, gathered from the SP region first.

        The gather's backward keeps this rank's slice of the gradient (`tensor_parallel_output_grad=False`):
        the loss all-reduces the hidden-state gradient over TP itself, as the output layer would.
        """
        if self.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=self.language_model.pg_collection.tp)
        return hidden.flatten(0, 1)[target_index]

    def output_weight(self) -> Tensor:
        """The output layer's weight on this (last) stage, [vocab / tp, h]: the tied embedding or `lm_head`."""
        lm = self.language_model
        if lm.share_embeddings_and_output_weights:
            return lm.shared_embedding_or_output_weight()
        return lm.output_layer.weight


def build_model(arch: QwenVLArch, cfg: ModelConfig, pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None, parallel_output: bool = True,
                perform_initialization: bool = False, use_cpu_initialization: bool | None = None) -> Qwen25VLModel:
    """Build this rank's stage (call after `pebr_mega.parallel.init_parallel(cfg.tp, cfg.pp)`).

    Parameters are left uninitialised unless `perform_initialization` (weights are normally loaded next).
    """
    config = transformer_config(arch, cfg, perform_initialization=perform_initialization,
                                use_cpu_initialization=use_cpu_initialization)
    device = torch.device("cpu") if config.use_cpu_initialization else torch.device("cuda", torch.cuda.current_device())
    check_backend(cfg.attention, device, config.params_dtype)
    model = Qwen25VLModel(config, arch, resolve_spec(cfg.spec), pre_process, post_process, vp_stage,
                          parallel_output, vision_recompute=cfg.vision_recompute, attention=cfg.attention)
    # Megatron's local/torch specs build torch.nn.RMSNorm on the CPU and in float32 whatever the config says
    # (Megatron-LM relies on its Float16Module and a later .cuda() to fix both); move and cast every parameter
    # here so a bf16 GPU model is bf16 and on the GPU throughout.
    model.to(device=device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != config.params_dtype:
            p.data = p.data.to(config.params_dtype)
    return model

