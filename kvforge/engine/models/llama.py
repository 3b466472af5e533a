"""kvforge's own Llama-family decoder: Llama, Mistral, Qwen2, Qwen3.

One implementation covers the four: grouped-query attention through the
paged kernels, RoPE (default, linear or Llama 3 scaled), RMSNorm, a SiLU
gated MLP; Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm and Mistral's
sliding window are switches of :class:`~kvforge.engine.model_config.ModelConfig`.
The q, k and v projections are fused into one matrix, and the gate and up
projections into another, so a layer is four matrix products.

The model owns no KV storage: every forward takes a
:class:`~kvforge.storage.StepBatch` (built by the cache's ``prepare_step``),
writes the new tokens' keys and values into the
:class:`~kvforge.storage.KVCache` at its ``slot_mapping`` and reads the
context through its block tables. Every tensor operation is
static in shape given its inputs, so the decode forward can be captured in
a CUDA graph.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kvforge import kernels
from kvforge.storage import KVCache, StepBatch
from kvforge.engine.model_config import WEIGHT_DTYPES, ModelConfig, TensorSpec, check_tensors
from kvforge.engine.models.layers import RotaryEmbedding, rms_norm
from kvforge.errors import ModelError

__all__ = ["LlamaModel", "LayerWeights"]


class LayerWeights(NamedTuple):
    """One decoder layer's tensors (``[out, in]`` matrices, as ``F.linear`` takes them).

    Biases are None when the checkpoint has none (``attention_bias`` puts
    one on q/k/v and, for Llama and Qwen3, on ``o_proj``; Llama's
    ``mlp_bias`` on gate/up and down)."""

    input_norm: Tensor
    qkv: Tensor
    qkv_bias: Tensor | None
    q_norm: Tensor | None
    k_norm: Tensor | None
    o_proj: Tensor
    post_norm: Tensor
    gate_up: Tensor
    down: Tensor
    o_bias: Tensor | None = None
    gate_up_bias: Tensor | None = None
    down_bias: Tensor | None = None


class LlamaModel:
    """The decoder with fused weights on one device, in one dtype.

    Build it with :meth:`from_state_dict` (Hugging Face parameter names) or
    :meth:`random`. :meth:`forward` returns the final hidden states ``[T,
    hidden]``; :meth:`compute_logits` turns selected rows into float32 logits.
    """

    def __init__(self, config: ModelConfig, embed: Tensor, layers: list[LayerWeights], norm: Tensor,
                 lm_head: Tensor, *, max_positions: int, fused: bool | None = None) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.device = embed.device
        self.rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling,
                                    self.dtype, self.device)
        self.scale = config.head_dim ** -0.5
        #: under tensor parallelism (:mod:`kvforge.engine.parallel`) the group whose ranks hold the
        #: other heads: the output and down projections' partial sums are all-reduced through it
        self.tp: Any = None
        self._fused = None
        self.set_fused(fused)

    def set_fused(self, fused: bool | None) -> None:
        """Use the Triton fused ops (:mod:`~kvforge.engine.models.fused`): None = on CUDA only.

        On the CPU they need ``TRITON_INTERPRET=1`` (tests)."""
        on = self.device.type == "cuda" if fused is None else bool(fused)
        if on and self.config.head_dim & (self.config.head_dim - 1):
            on = False  # the rope kernel wants a power-of-two head_dim
        if on:
            from kvforge.engine.models import fused as fused_ops
            self._fused = fused_ops
        else:
            self._fused = None

    @property
    def fused(self) -> bool:
        """Whether the Triton fused ops are in use."""
        return self._fused is not None

    # ------------------------------------------------------------- building
    @classmethod
    def from_state_dict(cls, config: ModelConfig, tensors: Mapping[str, Tensor], *, dtype: torch.dtype,
                        device: torch.device, max_positions: int | None = None) -> LlamaModel:
        """Fuse and place Hugging Face tensors (``model.layers.{i}.self_attn.q_proj.weight``, ...).

        Before any tensor is cast or moved, every name, shape and dtype is held
        against the config (:func:`~kvforge.engine.model_config.check_tensors`,
        through ``tensors.specs`` when the mapping has them, as the loader's
        lazy safetensors weights do, so nothing is read twice). Raises
        :class:`ModelError` naming the first missing tensor, a few of the
        tensors the model would not use (a checkpoint option the engine does
        not implement must not be ignored silently), a tensor of the wrong
        shape, or an integer / quantized tensor."""
        specs: Mapping[str, TensorSpec] | None = getattr(tensors, "specs", None)
        if specs is None:
            for name, t in tensors.items():
                if not isinstance(t, Tensor):
                    raise ModelError(f"{config.architecture} checkpoint: {name!r} is a {type(t).__name__}, "
                                     f"not a tensor")
            specs = {name: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
                     for name, t in tensors.items()}
        check_tensors(config, specs)
        expected = config.expected_tensors()

        def need(name: str) -> Tensor:
            t = tensors[name]
            _check_shape(name, t, expected[name].shape)  # the tensor read is the one its header announced
            return t.to(device=device, dtype=dtype)

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            m = p + "mlp."
            q, k, v = need(a + "q_proj.weight"), need(a + "k_proj.weight"), need(a + "v_proj.weight")
            # a bias the config does not declare was refused by check_tensors, as an unused tensor
            bias = torch.cat([need(a + f"{n}_proj.bias") for n in "qkv"]) if config.qkv_bias else None
            gate_up_bias = torch.cat([need(m + "gate_proj.bias"), need(m + "up_proj.bias")]) \
                if config.mlp_bias else None
            layers.append(LayerWeights(
                input_norm=need(p + "input_layernorm.weight"),
                qkv=torch.cat([q, k, v]).contiguous(), qkv_bias=bias,
                q_norm=need(a + "q_norm.weight") if config.qk_norm else None,
                k_norm=need(a + "k_norm.weight") if config.qk_norm else None,
                o_proj=need(a + "o_proj.weight"),
                post_norm=need(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([need(m + "gate_proj.weight"), need(m + "up_proj.weight")]).contiguous(),
                down=need(m + "down_proj.weight"),
                o_bias=need(a + "o_proj.bias") if config.o_bias else None,
                gate_up_bias=gate_up_bias,
                down_bias=need(m + "down_proj.bias") if config.mlp_bias else None,
            ))
            del q, k, v
        embed = need("model.embed_tokens.weight")
        # check_tensors: lm_head.weight is there unless the embeddings are tied
        head = need("lm_head.weight") if "lm_head.weight" in specs else embed
        final_norm = need("model.norm.weight")
        return cls(config, embed, layers, final_norm, head,
                   max_positions=max_positions or config.max_position_embeddings)

    @classmethod
    def random(cls, config: ModelConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
               max_positions: int | None = None) -> LlamaModel:
        """Random weights (normal, std ``initializer_range``; norms 1), made on the device."""
        gen = torch.Generator(device=device).manual_seed(seed)
        std = config.initializer_range

        def w(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=dtype, device=device) * std

        def ones(n: int) -> Tensor:
            return torch.ones(n, dtype=dtype, device=device)

        c = config
        layers = [LayerWeights(
            input_norm=ones(c.hidden_size), qkv=w(c.q_size + 2 * c.kv_size, c.hidden_size),
            qkv_bias=w(c.q_size + 2 * c.kv_size) if c.qkv_bias else None,
            q_norm=ones(c.head_dim) if c.qk_norm else None, k_norm=ones(c.head_dim) if c.qk_norm else None,
            o_proj=w(c.hidden_size, c.q_size), post_norm=ones(c.hidden_size),
            gate_up=w(2 * c.intermediate_size, c.hidden_size), down=w(c.hidden_size, c.intermediate_size),
            o_bias=w(c.hidden_size) if c.o_bias else None,
            gate_up_bias=w(2 * c.intermediate_size) if c.mlp_bias else None,
            down_bias=w(c.hidden_size) if c.mlp_bias else None,
        ) for _ in range(c.num_layers)]
        embed = w(c.vocab_size, c.hidden_size)
        head = embed if c.tie_word_embeddings else w(c.vocab_size, c.hidden_size)
        return cls(config, embed, layers, ones(c.hidden_size), head,
                   max_positions=max_positions or c.max_position_embeddings)

    @property
    def num_parameter_bytes(self) -> int:
        """Bytes of the weights on the device (a tied head counted once)."""
        seen: dict[int, int] = {}
        tensors = [self.embed, self.norm, self.lm_head] + [t for lw in self.layers for t in lw if t is not None]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -------------------------------------------------------------- forward
    def forward(self, batch: StepBatch, cache: KVCache) -> Tensor:
        """Final hidden states ``[T, hidden]`` of the step's tokens (``batch.input_ids``
        at ``batch.positions``).

        Writes every token's keys/values into ``cache`` at ``batch.slot_mapping``
        before attending, layer by layer."""
        c = self.config
        positions = batch.positions
        x = F.embedding(batch.input_ids, self.embed)
        fz = self._fused
        if fz is not None:
            # F.embedding returned a fresh tensor: it becomes the residual stream, updated in place
            h, residual = fz.add_rms_norm(x, None, self.layers[0].input_norm, c.rms_norm_eps)
            for i, lw in enumerate(self.layers):
                a = self._attention(i, lw, h, positions, batch, cache)
                h, residual = fz.add_rms_norm(a, residual, lw.post_norm, c.rms_norm_eps)
                m = self._reduce(F.linear(fz.silu_mul(F.linear(h, lw.gate_up, lw.gate_up_bias)), lw.down,
                                          lw.down_bias))
                nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
                h, residual = fz.add_rms_norm(m, residual, nxt, c.rms_norm_eps)
            return h
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.input_norm, c.rms_norm_eps)
            x = x + self._attention(i, lw, h, positions, batch, cache)
            h = rms_norm(x, lw.post_norm, c.rms_norm_eps)
            gate, up = F.linear(h, lw.gate_up, lw.gate_up_bias).chunk(2, dim=-1)
            x = x + self._reduce(F.linear(F.silu(gate) * up, lw.down, lw.down_bias))
        return rms_norm(x, self.norm, c.rms_norm_eps)

    def _attention(self, layer: int, lw: LayerWeights, h: Tensor, positions: Tensor, batch: StepBatch,
                   cache: KVCache) -> Tensor:
        c = self.config
        t = h.shape[0]
        qkv = F.linear(h, lw.qkv, lw.qkv_bias)
        q = qkv[:, : c.q_size].view(t, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size: c.q_size + c.kv_size].view(t, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].view(t, c.num_kv_heads, c.head_dim)
        if lw.q_norm is not None and lw.k_norm is not None:
            q = rms_norm(q, lw.q_norm, c.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, c.rms_norm_eps)
        if self._fused is not None:
            self._fused.rope_(q, k, self.rope.cos, self.rope.sin, positions)
        else:
            q, k = self.rope.apply(q, k, positions)
        if batch.groups:  # a sliding-window layer's own slots and tables
            batch = batch.for_group(cache.layer_groups[layer])
        cache.write(layer, batch.slot_mapping, k, v)
        view = cache.layer_view(layer)
        window = c.sliding_windows[layer]
        backend = cache.backend
        nd = batch.num_decodes
        if batch.is_decode:
            assert batch.decode_block_tables is not None and batch.decode_context_lens is not None
            o = kernels.paged_decode_attention(
                q, view, None, batch.decode_block_tables, batch.decode_context_lens, scale=self.scale,
                sliding_window=window, backend=backend)
        else:
            # decodes and prefill chunks in separate kernels: each gets tiles shaped for its rows
            assert batch.prefill_block_tables is not None and batch.prefill_context_lens is not None
            assert batch.cu_query_lens is not None
            o = q.new_empty(q.shape)
            if nd:
                assert batch.decode_block_tables is not None and batch.decode_context_lens is not None
                kernels.paged_decode_attention(
                    q[:nd], view, None, batch.decode_block_tables, batch.decode_context_lens, scale=self.scale,
                    sliding_window=window, out=o[:nd], backend=backend)
            kernels.paged_prefill_attention(
                q[nd:], view, None, batch.prefill_block_tables, batch.cu_query_lens, batch.prefill_context_lens,
                scale=self.scale, sliding_window=window, out=o[nd:], backend=backend)
        return self._reduce(F.linear(o.view(t, c.q_size), lw.o_proj, lw.o_bias))

    def _reduce(self, x: Tensor) -> Tensor:
        """``x`` summed over the tensor-parallel ranks (itself without them)."""
        return x if self.tp is None else self.tp.all_reduce(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Float32 logits ``[N, vocab]`` of hidden rows ``[N, hidden]``."""
        return F.linear(hidden, self.lm_head).float()


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    """``t`` is a float tensor of ``shape`` (what the config says ``name`` is), else :class:`ModelError`."""
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in WEIGHT_DTYPES:
        raise ModelError(f"tensor {name!r} has dtype {dtype}; the engine loads {'/'.join(WEIGHT_DTYPES)} "
                         f"weights and refuses integer and quantized tensors (no quantized format is supported)")
    if tuple(t.shape) != shape:
        raise ModelError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape} from config.json")
