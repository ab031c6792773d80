"""Hugging Face checkpoints: one decoder layer's MoE block as a jaxmoe layer, and the layer back as the Hub's tensors.

    layer = jaxmoe.hf.load_layer("DeepSeek-V3", 3)        # an nnx jaxmoe.MoELayer; layer(x) = the block's output
    tensors = jaxmoe.hf.export_layer(layer, "DeepSeek-V3", 3)   # {on-disk name: numpy array}, the file's layout

The block's math in transformers 5.17, family by family, with the config.json key behind every number, is in
tests/fixtures/SEMANTICS.md; `_FAMILIES` below turns a config into jaxmoe's Router / Experts / MoELayer options and says where each
parameter lies on disk. Orientation: transformers stores nn.Linear weights as [out, in] (y = x W^T) and jaxmoe as
[in, out] (y = x W), so per-expert and shared-expert matrices are transposed on the way in and out; gpt-oss and
Llama 4 store fused 3D expert tensors already as [E, in, out].

Only the tensors of the asked layer are read (memory-mapped), from model.safetensors or the shards named by
model.safetensors.index.json. Quantised checkpoints are dequantised on load:
- block fp8 (DeepSeek-V3/R1, Kimi K2): W[i, j] = q[i, j] * weight_scale_inv[i // bm, j // bn], (bm, bn) =
  quantization_config.weight_block_size (128 x 128), the last block partial when a dim is not a multiple;
- MXFP4 (gpt-oss): X_blocks [..., R, G, 16] uint8 holds 32 e2m1 values per block, low nibble first, X_scales
  [..., R, G] the block's exponent + 127; the dense tensor is the [..., R, 32 G] values transposed to [..., 32 G, R].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.core.meta
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe import _safetensors
from jaxmoe import linen as _linen
from jaxmoe.layers import MoELayer
from jaxmoe.options import Experts, Router

# --- the families ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What config.json says about one MoE layer: the jaxmoe options and where the tensors lie."""
    model_type: str
    layer: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    router: tuple            # (name, value) pairs for jaxmoe.Router
    experts: tuple           # (name, value) pairs for jaxmoe.Experts
    options: tuple           # (name, value) pairs for jaxmoe.MoELayer
    block: tuple[str, ...]   # candidate names of the block's module ("mlp", "block_sparse_moe", "feed_forward")
    router_name: str         # the router module's name in the block ("gate" or "router")
    expert_layout: str       # "per_expert", "interleaved" (gpt-oss [E, d, 2f]) or "halves" (Llama 4 [E, d, 2f])
    expert_names: tuple[str, str, str]  # per_expert: the gate, up and down modules' names
    shared_name: str | None  # the shared expert module's name, or None
    shared_d_ff: int
    config_keys: tuple       # (what, config.json key) pairs, for error messages


SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "kimi_k2", "llama4", "llama4_text",
                         "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


class _Config:
    """config.json's values, with transformers' class defaults where the file leaves a key out."""

    def __init__(self, values: dict, defaults: dict, source: str):
        self.values, self.defaults, self.source = values, defaults, source

    def __call__(self, key: str):
        value = self.values.get(key, self.defaults.get(key))
        if value is None and key not in self.defaults:
            raise ValueError(f"{self.source} has no {key!r}, which this model type needs")
        return value


    def experts(self, *keys: str) -> tuple[int, str]:
        """E and the key it was read from: transformers writes either name of an attribute_map pair."""
        for key in keys:
            if self.values.get(key) is not None:
                return self.values[key], key
        return self(keys[0]), keys[0]


def _moe_layers_of(model_type: str, c: _Config) -> list[int]:
    n = c("num_hidden_layers")
    if model_type in ("mixtral", "olmoe", "gpt_oss"):
        return list(range(n))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step, dense = c("decoder_sparse_step"), set(c("mlp_only_layers") or [])
        if not c.experts("num_experts", "num_local_experts")[0]:
            return []
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    if model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return list(range(c("first_k_dense_replace") or 0, n))
    if model_type == "llama4_text":
        if c("moe_layers") is not None:
            return list(c("moe_layers"))
        step = c("interleave_moe_layer_step")
        return list(range(step - 1, n, step))
    raise AssertionError(model_type)


# transformers 5.17's config class defaults for the keys read here (configuration_*.py)
_DEFAULTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336, hidden_act="silu"),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=None, hidden_act="silu"),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=None, hidden_act="silu"),
    "olmoe": dict(num_experts=64, num_experts_per_tok=8, intermediate_size=2048, norm_topk_prob=False,
                  hidden_act="silu"),
    "deepseek_v2": dict(n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1407,
                        routed_scaling_factor=1.0, topk_method="greedy", n_group=None, topk_group=None,
                        first_k_dense_replace=0, mlp_bias=False, hidden_act="silu"),
    "deepseek_v3": dict(n_routed_experts=256, n_shared_experts=1, moe_intermediate_size=2048, num_experts_per_tok=8,
                        routed_scaling_factor=2.5, n_group=8, topk_group=4, norm_topk_prob=True,
                        first_k_dense_replace=3, hidden_act="silu"),
    "glm4_moe": dict(n_routed_experts=128, n_shared_experts=1, moe_intermediate_size=1408, num_experts_per_tok=8,
                     routed_scaling_factor=1.0, n_group=1, topk_group=1, norm_topk_prob=True,
                     first_k_dense_replace=1, hidden_act="silu"),
    "gpt_oss": dict(num_local_experts=128, num_experts_per_tok=4, intermediate_size=2880),
    "llama4_text": dict(num_local_experts=16, num_experts_per_tok=1, intermediate_size=8192, moe_layers=None,
                        interleave_moe_layer_step=1, hidden_act="silu"),
}


# config.json's keys for E (either name of transformers' attribute_map pair; the first is the usual one) and for f
_SIZE_KEYS = {
    "mixtral": (("num_local_experts", "num_experts"), "intermediate_size"),
    "qwen2_moe": (("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "qwen3_moe": (("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "olmoe": (("num_experts", "num_local_experts"), "intermediate_size"),
    "deepseek_v2": (("n_routed_experts", "num_experts"), "moe_intermediate_size"),
    "deepseek_v3": (("n_routed_experts", "num_local_experts"), "moe_intermediate_size"),
    "glm4_moe": (("n_routed_experts", "num_local_experts"), "moe_intermediate_size"),
    "gpt_oss": (("num_local_experts", "num_experts"), "intermediate_size"),
    "llama4_text": (("num_local_experts", "num_experts"), "intermediate_size"),
}


def plan_layer(config: dict, layer: int, source: str = "config.json") -> LayerPlan:
    """The jaxmoe options and on-disk layout of decoder layer `layer`'s MoE block, from a config.json dict."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported by jaxmoe.hf; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "kimi_k2":  # Kimi K2 is DeepSeek-V3's architecture (transformers maps it so too)
        model_type = "deepseek_v3"
    if model_type == "llama4":  # the multimodal checkpoint: the language model's numbers are in text_config
        config, source, model_type = config.get("text_config") or {}, source + " text_config", "llama4_text"
    c = _Config(config, _DEFAULTS[model_type], source)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    n_layers = c("num_hidden_layers")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: {source} has num_hidden_layers={n_layers}")
    moe_layers = _moe_layers_of(model_type, c)
    if layer not in moe_layers:
        raise ValueError(f"layer {layer} of this {model_type} checkpoint is a dense MLP, not an MoE block; "
                         f"its MoE layers are {_ranges(moe_layers)}")
    if model_type != "gpt_oss" and c("hidden_act") != "silu":
        raise ValueError(f"{source}: hidden_act {c('hidden_act')!r} is not supported (jaxmoe's experts are SwiGLU, "
                         f"hidden_act 'silu')")

    d = c("hidden_size")
    e_keys, f_key = _SIZE_KEYS[model_type]
    (E, e_key), f = c.experts(*e_keys), c(f_key)
    block, router_name, layout, names = ("mlp",), "gate", "per_expert", ("gate_proj", "up_proj", "down_proj")
    shared_name, shared_d_ff = None, 0
    router: dict[str, Any] = dict(scoring="softmax", renormalize=True)
    experts: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if model_type == "mixtral":
        block, names = ("block_sparse_moe", "mlp"), ("w1", "w3", "w2")
    elif model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
        router["renormalize"] = bool(c("norm_topk_prob"))
        if model_type == "qwen2_moe":
            shared_name, shared_d_ff = "shared_expert", c("shared_expert_intermediate_size")
            options.update(num_shared_experts=1, shared_gate=True)
    elif model_type == "deepseek_v2":
        method = c("topk_method")
        if method == "group_limited_greedy":
            router.update(num_groups=c("n_group"), top_groups=c("topk_group"), group_score="max")
        elif method != "greedy":
            raise ValueError(f"{source}: topk_method {method!r} is not one transformers' DeepSeek-V2 runs "
                             f"('greedy', 'group_limited_greedy')")
        # transformers 5.17 never renormalises DeepSeek-V2's weights and always scales them (tests/fixtures/SEMANTICS.md)
        router.update(renormalize=False, scaling_factor=float(c("routed_scaling_factor")))
        if c("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true (biased shared experts) is not supported")
    elif model_type in ("deepseek_v3", "glm4_moe"):
        router.update(scoring="sigmoid", renormalize=bool(c("norm_topk_prob")), renormalize_epsilon=1e-20,
                      num_groups=c("n_group"), top_groups=c("topk_group"), group_score="top2_sum",
                      scaling_factor=float(c("routed_scaling_factor")))
        options.update(selection_bias=True)
    elif model_type == "gpt_oss":
        router_name, layout = "router", "interleaved"
        # alpha and limit are constants in transformers' GptOssExperts (the config's swiglu_limit is not read)
        experts.update(activation="clamped_swiglu", alpha=1.702, limit=7.0)
        options.update(router_bias=True, expert_bias=True)
    else:  # llama4_text
        block, router_name, layout = ("feed_forward",), "router", "halves"
        router["renormalize"] = False
        router["scoring"] = "sigmoid"
        experts["weight_on"] = "input"
        shared_name, shared_d_ff = "shared_expert", f
        options.update(num_shared_experts=1)
    if model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        n_shared = c("n_shared_experts") or 0
        if n_shared:
            shared_name, shared_d_ff = "shared_experts", n_shared * f
            options.update(num_shared_experts=n_shared)
    if shared_name is not None:
        options["shared_d_ff"] = shared_d_ff
    router["top_k"] = k = c("num_experts_per_tok")
    return LayerPlan(model_type=model_type, layer=int(layer), d_model=d, d_ff=f, num_experts=E, top_k=k,
                     router=tuple(sorted(router.items())), experts=tuple(sorted(experts.items())),
                     options=tuple(sorted(options.items())), block=block, router_name=router_name,
                     expert_layout=layout, expert_names=names, shared_name=shared_name, shared_d_ff=shared_d_ff,
                     config_keys=(("d", "hidden_size"), ("E", e_key), ("f", f_key)))


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


# --- the checkpoint ------------------------------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory: config.json, and model.safetensors or the shards of model.safetensors.index.json."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        config_path = os.path.join(self.directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} does not exist: jaxmoe.hf needs a Hugging Face checkpoint "
                                    f"directory (config.json and model.safetensors or model.safetensors.index.json)")
        with open(config_path) as f:
            self.config = json.load(f)
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        single_path = os.path.join(self.directory, "model.safetensors")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            self.listing = index_path
        elif os.path.isfile(single_path):
            self._files = {"model.safetensors": _safetensors.SafetensorsFile(single_path)}
            self.weight_map = dict.fromkeys(self._files["model.safetensors"].names, "model.safetensors")
            self.listing = single_path
        else:
            raise FileNotFoundError(f"{self.directory} has neither model.safetensors nor "
                                    f"model.safetensors.index.json")
        if not hasattr(self, "_files"):
            self._files = {}
        quantization = self.config.get("quantization_config") or {}
        if model_type_is_llama4(self.config) and not quantization:
            quantization = (self.config.get("text_config") or {}).get("quantization_config") or {}
        self.quant_method = quantization.get("quant_method")
        self.fp8_block = tuple(quantization.get("weight_block_size") or (128, 128))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> _safetensors.SafetensorsFile:
        filename = self.weight_map[name]
        if filename not in self._files:
            path = os.path.join(self.directory, filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.listing} puts {name!r} in {filename}, which does not exist")
            self._files[filename] = _safetensors.SafetensorsFile(path)
        file = self._files[filename]
        if name not in file.names:
            raise KeyError(f"{file.path} has no tensor {name!r}, though {self.listing} says it holds it")
        return file

    def raw(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing: {self.listing} has no such key")
        return self.file_of(name).read(name)

    def dense(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, dequantised when the file holds it as fp8 with a weight_scale_inv or as MXFP4
        name_blocks and name_scales."""
        if name in self.weight_map:
            w = self.raw(name)
            scale_name = name + "_scale_inv"
            if scale_name in self.weight_map:
                return _dequantize_fp8(w, self.raw(scale_name), self.fp8_block, name, self.file_of(name).path)
            return np.asarray(w, np.float32)
        if name + "_blocks" in self.weight_map and name + "_scales" in self.weight_map:
            return _dequantize_mxfp4(self.raw(name + "_blocks"), self.raw(name + "_scales"), name)
        raise KeyError(f"tensor {name!r} is missing: {self.listing} has no such key"
                       + (f" (nor {name}_blocks and {name}_scales)" if self.quant_method == "mxfp4" else ""))

    def stored_dtype(self, name: str) -> np.dtype | None:
        """The float dtype `name` is stored in, or None when it is stored quantised."""
        if name not in self.weight_map or name + "_scale_inv" in self.weight_map:
            return None
        dtype_name = self.file_of(name).dtype_name(name)
        return _safetensors.DTYPES[dtype_name] if dtype_name in ("F64", "F32", "F16", "BF16") else None


def model_type_is_llama4(config: dict) -> bool:
    return config.get("model_type") == "llama4"


def _dequantize_fp8(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str, path: str) -> np.ndarray:
    rows, cols = q.shape[-2:]
    bm, bn = block
    want = (*q.shape[:-2], math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{path}: {name}_scale_inv has shape {tuple(scale_inv.shape)}, but {name} {tuple(q.shape)} "
                         f"in {bm}x{bn} blocks needs {want}")
    scale = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), bm, -2), bn, -1)[..., :rows, :cols]
    return np.asarray(q, np.float32) * scale


_FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                     np.float32)


def _dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != 16:
        raise ValueError(f"{name}_blocks {blocks.shape} {blocks.dtype} and {name}_scales {scales.shape} "
                         f"{scales.dtype} are not MXFP4 (uint8 [..., G, 16] and uint8 [..., G])")
    values = np.stack([_FP4_E2M1[blocks & 0x0F], _FP4_E2M1[blocks >> 4]], axis=-1)  # low nibble first
    values = values.reshape(*blocks.shape[:-1], 32) * np.exp2(scales.astype(np.float32) - 127)[..., None]
    dense = values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)  # [..., R, 32 G]
    return np.swapaxes(dense, -1, -2)


# --- on-disk names and the jaxmoe parameters -----------------------------------------------------------------------


def _prefix(plan: LayerPlan, ckpt: Checkpoint) -> str:
    """The block's key prefix, e.g. "model.layers.3.mlp." or "language_model.model.layers.3.feed_forward."."""
    for block in plan.block:
        tail = f"layers.{plan.layer}.{block}.{plan.router_name}.weight"
        found = sorted(name for name in ckpt.weight_map if name == tail or name.endswith("." + tail))
        if found:
            return found[0][: -len(f"{plan.router_name}.weight")]
    raise KeyError(f"tensor '...layers.{plan.layer}.{plan.block[0]}.{plan.router_name}.weight' (layer {plan.layer}'s "
                   f"router) is missing: {ckpt.listing} has no such key")


def tensor_names(plan: LayerPlan, prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """On-disk name -> (how it maps to jaxmoe, its shape by config.json), for every tensor of the block.

    The mapping is one of: "router" (W.T), "router_bias", "selection_bias", "shared_output_gate" (W[0]),
    ("expert", e, part) with part in gate/up/down (W.T), "fused_gate_up" / "fused_down" (gpt-oss, Llama 4),
    "fused_gate_up_bias" / "fused_down_bias", ("shared", part) (W.T).
    """
    d, f, E = plan.d_model, plan.d_ff, plan.num_experts
    p, names = prefix, {}
    names[p + f"{plan.router_name}.weight"] = ("router", (E, d))
    options = dict(plan.options)
    if options.get("router_bias"):
        names[p + f"{plan.router_name}.bias"] = ("router_bias", (E,))
    if options.get("selection_bias"):
        names[p + f"{plan.router_name}.e_score_correction_bias"] = ("selection_bias", (E,))
    if plan.expert_layout == "per_expert":
        gate, up, down = plan.expert_names
        for e in range(E):
            names[p + f"experts.{e}.{gate}.weight"] = (("expert", e, "gate"), (f, d))
            names[p + f"experts.{e}.{up}.weight"] = (("expert", e, "up"), (f, d))
            names[p + f"experts.{e}.{down}.weight"] = (("expert", e, "down"), (d, f))
    else:
        names[p + "experts.gate_up_proj"] = ("fused_gate_up", (E, d, 2 * f))
        names[p + "experts.down_proj"] = ("fused_down", (E, f, d))
        if options.get("expert_bias"):
            names[p + "experts.gate_up_proj_bias"] = ("fused_gate_up_bias", (E, 2 * f))
            names[p + "experts.down_proj_bias"] = ("fused_down_bias", (E, d))
    if plan.shared_name is not None:
        s, fs = p + plan.shared_name + ".", plan.shared_d_ff
        names[s + "gate_proj.weight"] = (("shared", "gate"), (fs, d))
        names[s + "up_proj.weight"] = (("shared", "up"), (fs, d))
        names[s + "down_proj.weight"] = (("shared", "down"), (d, fs))
        if options.get("shared_gate"):
            names[p + "shared_expert_gate.weight"] = ("shared_output_gate", (1, d))
    return names


def _config_numbers(plan: LayerPlan) -> str:
    values = {"d": plan.d_model, "E": plan.num_experts, "f": plan.d_ff}
    text = ", ".join(f"{key}={values[what]}" for what, key in plan.config_keys)
    if plan.shared_name is not None:
        text += f", shared width {plan.shared_d_ff}"
    return text


def read_arrays(ckpt: Checkpoint, plan: LayerPlan, dtype) -> tuple[dict[str, np.ndarray], str]:
    """The layer's parameters by jaxmoe name, as numpy arrays of `dtype` (selection_bias float32), and the prefix."""
    prefix = _prefix(plan, ckpt)
    f, E = plan.d_ff, plan.num_experts
    per_expert = {"gate": [None] * E, "up": [None] * E, "down": [None] * E}
    out: dict[str, np.ndarray] = {}
    for name, (role, shape) in tensor_names(plan, prefix).items():
        w = ckpt.dense(name)
        if tuple(w.shape) != shape:
            where = ckpt.weight_map.get(name, ckpt.weight_map.get(name + "_blocks"))
            raise ValueError(f"tensor {name!r} in {where} has shape {tuple(w.shape)}, but config.json "
                             f"({_config_numbers(plan)}) gives {shape}")
        if isinstance(role, tuple) and role[0] == "expert":
            per_expert[role[2]][role[1]] = w.T
        elif isinstance(role, tuple):  # shared
            out[{"gate": "shared_w_gate", "up": "shared_w_up", "down": "shared_w_down"}[role[1]]] = w.T
        elif role == "router":
            out["router"] = w.T
        elif role == "shared_output_gate":
            out["shared_output_gate"] = w[0]
        elif role in ("router_bias", "selection_bias"):
            out[role] = w
        elif role == "fused_gate_up":
            out["w_gate"], out["w_up"] = ((w[..., 0::2], w[..., 1::2]) if plan.expert_layout == "interleaved"
                                          else (w[..., :f], w[..., f:]))
        elif role == "fused_gate_up_bias":
            out["b_gate"], out["b_up"] = w[..., 0::2], w[..., 1::2]
        elif role == "fused_down":
            out["w_down"] = w
        elif role == "fused_down_bias":
            out["b_down"] = w
    if plan.expert_layout == "per_expert":
        out["w_gate"], out["w_up"], out["w_down"] = (np.stack(per_expert[part]) for part in ("gate", "up", "down"))
    dtype = np.dtype(dtype)
    return {name: np.ascontiguousarray(a, np.float32 if name == "selection_bias" else dtype)
            for name, a in out.items()}, prefix


def export_arrays(plan: LayerPlan, prefix: str, params: dict[str, np.ndarray],
                  dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """The inverse of read_arrays: jaxmoe parameters -> {on-disk name: array in the checkpoint's layout}."""
    f = plan.d_ff
    out = {}
    for name, (role, shape) in tensor_names(plan, prefix).items():
        if isinstance(role, tuple) and role[0] == "expert":
            w = params[{"gate": "w_gate", "up": "w_up", "down": "w_down"}[role[2]]][role[1]].T
        elif isinstance(role, tuple):
            w = params[{"gate": "shared_w_gate", "up": "shared_w_up", "down": "shared_w_down"}[role[1]]].T
        elif role == "router":
            w = params["router"].T
        elif role == "shared_output_gate":
            w = params["shared_output_gate"][None, :]
        elif role in ("router_bias", "selection_bias"):
            w = params[role]
        elif role in ("fused_gate_up", "fused_gate_up_bias"):
            gate, up = ((params["w_gate"], params["w_up"]) if role == "fused_gate_up"
                        else (params["b_gate"], params["b_up"]))
            if plan.expert_layout == "interleaved":
                w = np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * f)
            else:
                w = np.concatenate([gate, up], axis=-1)
        elif role == "fused_down":
            w = params["w_down"]
        else:  # fused_down_bias
            w = params["b_down"]
        assert tuple(w.shape) == shape, (name, w.shape, shape)
        out[name] = np.ascontiguousarray(w, dtypes[name])
    return out


# --- the public API ------------------------------------------------------------------------------------------------

_CONFIG_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _param_dtype(ckpt: Checkpoint, dtype) -> np.dtype:
    """`dtype`, or where None the dtype config.json names (transformers writes "dtype", older files "torch_dtype"),
    else float32. Quantised tensors are dequantised to it."""
    if dtype is not None:
        return np.dtype(jnp.dtype(dtype))
    for config in (ckpt.config, ckpt.config.get("text_config") or {}):
        name = config.get("dtype", config.get("torch_dtype"))
        if name in _CONFIG_DTYPES:
            return np.dtype(jnp.dtype(_CONFIG_DTYPES[name]))
    return np.dtype(np.float32)


def _param_names(plan: LayerPlan) -> list[str]:
    options = dict(plan.options)
    names = ["router", "w_gate", "w_up", "w_down"]
    if options.get("router_bias"):
        names.append("router_bias")
    if options.get("expert_bias"):
        names += ["b_gate", "b_up", "b_down"]
    if plan.shared_name is not None:
        names += ["shared_w_gate", "shared_w_up", "shared_w_down"]
    if options.get("shared_gate"):
        names.append("shared_output_gate")
    return names


def _layer_options(plan: LayerPlan, param_dtype, compute_dtype, implementation, layer_kwargs: dict) -> dict:
    clash = {"router", "experts", "param_dtype", "top_k", "scoring", "renormalize", "rngs"} & set(layer_kwargs)
    clash |= {name for name, _ in plan.options} & set(layer_kwargs)
    if clash:
        raise TypeError(f"{sorted(clash)} are set from config.json or load_layer's own arguments, not layer_kwargs")
    return dict(router=Router(**dict(plan.router)), experts=Experts(**dict(plan.experts)), **dict(plan.options),
                param_dtype=param_dtype, dtype=compute_dtype, implementation=implementation, **layer_kwargs)


def load_layer(checkpoint_dir, layer: int, *, dtype=None, compute_dtype=None, implementation: str | None = None,
               **layer_kwargs):
    """Decoder layer `layer`'s MoE block of a Hugging Face checkpoint as an nnx `jaxmoe.MoELayer`.

    `layer(x)` for x [..., d] gives what the transformers block gives (its first output, in x's shape). The router,
    expert and shared-expert options come from config.json (tests/fixtures/SEMANTICS.md says how, family by family); only this
    layer's tensors are read.

    Args:
      checkpoint_dir: a directory with config.json and model.safetensors or model.safetensors.index.json and its
        shards (model_type one of `SUPPORTED_MODEL_TYPES`).
      layer: the decoder layer's index; it must be one of the model's MoE layers.
      dtype: the parameters' dtype (MoELayer's param_dtype); fp8 and MXFP4 weights are dequantised to it. None: the
        dtype config.json names, else float32. The selection bias (DeepSeek-V3's e_score_correction_bias) stays
        float32.
      compute_dtype: MoELayer's dtype, the computation's (None: x's).
      implementation: passed to MoELayer.
      layer_kwargs: more MoELayer arguments (mesh, expert_axis, data_axis).
    """
    ckpt = Checkpoint(checkpoint_dir)
    plan = plan_layer(ckpt.config, layer, os.path.join(ckpt.directory, "config.json"))
    param_dtype = _param_dtype(ckpt, dtype)
    arrays, _ = read_arrays(ckpt, plan, param_dtype)
    options = _layer_options(plan, jnp.dtype(param_dtype), compute_dtype, implementation, layer_kwargs)
    # Built abstractly (no random initialisation of what the checkpoint then overwrites), then filled in.
    module = nnx.eval_shape(lambda: MoELayer(plan.d_model, plan.d_ff, plan.num_experts, **options,
                                                    rngs=nnx.Rngs(0)))
    names = _param_names(plan)
    if set(names) != set(module.param_names):
        raise AssertionError(f"jaxmoe.hf fills {sorted(names)} but MoELayer has {sorted(module.param_names)}")
    for name in names + (["selection_bias"] if "selection_bias" in arrays else []):
        variable = getattr(module, name)
        want = variable.get_value()  # a jax.ShapeDtypeStruct until filled
        if tuple(want.shape) != arrays[name].shape:
            raise AssertionError(f"jaxmoe.hf maps {name} to {arrays[name].shape} but MoELayer has {want.shape}")
        variable.set_value(jnp.asarray(arrays[name], want.dtype))
    unfilled = [path for path, variable in nnx.to_flat_state(nnx.state(module))
                if isinstance(variable.get_value(), jax.ShapeDtypeStruct)]
    if unfilled:
        raise AssertionError(f"MoELayer has variables {unfilled} that jaxmoe.hf does not fill")
    return module


def load_linen_layer(checkpoint_dir, layer: int, *, dtype=None, compute_dtype=None,
                     implementation: str | None = None, **layer_kwargs):
    """`load_layer` for flax.linen: (a `jaxmoe.linen.MoELayer`, its variables) with
    variables = {"params": {...}} plus {"router_state": {"selection_bias": ...}} where the family has one;
    `module.apply(variables, x)` gives the block's output."""
    ckpt = Checkpoint(checkpoint_dir)
    plan = plan_layer(ckpt.config, layer, os.path.join(ckpt.directory, "config.json"))
    param_dtype = _param_dtype(ckpt, dtype)
    arrays, _ = read_arrays(ckpt, plan, param_dtype)
    options = _layer_options(plan, jnp.dtype(param_dtype), compute_dtype, implementation, layer_kwargs)
    module = _linen.MoELayer(plan.d_model, plan.d_ff, plan.num_experts, **options)
    variables = {"params": {name: jnp.asarray(arrays[name]) for name in _param_names(plan)}}
    if "selection_bias" in arrays:
        variables["router_state"] = {"selection_bias": jnp.asarray(arrays["selection_bias"])}
    return module, variables


def export_layer(layer, checkpoint_dir, layer_index: int, *, dtype=None) -> dict[str, np.ndarray]:
    """The layer's weights as the checkpoint's on-disk tensors: {name: numpy array}, in its layout.

    `layer` is an nnx MoELayer (e.g. from `load_layer`, fine-tuned) or linen variables ({"params": ...,
    "router_state": ...}); `checkpoint_dir` and `layer_index` name the checkpoint and layer it goes back to (its
    config.json fixes the names and layout). Each tensor has the dtype it has on disk; tensors stored quantised there
    come back unquantised (fp8 `X.weight` without `X.weight_scale_inv`, MXFP4 `X` instead of `X_blocks` and
    `X_scales`), in `dtype` (None: the layer's). `save_safetensors` writes the result.
    """
    ckpt = Checkpoint(checkpoint_dir)
    plan = plan_layer(ckpt.config, layer_index, os.path.join(ckpt.directory, "config.json"))
    prefix = _prefix(plan, ckpt)
    if isinstance(layer, Mapping):
        layer = flax.core.meta.unbox(layer)  # variables from linen's init hold boxed (partitioned) params
        values = dict(layer.get("params", {}))
        values.update(layer.get("router_state", {}))
    else:
        values = {name: getattr(layer, name).get_value() for name in _param_names(plan)}
        if dict(plan.options).get("selection_bias"):
            values["selection_bias"] = layer.selection_bias.get_value()
    missing = [name for name in _param_names(plan) if name not in values]
    if missing:
        raise KeyError(f"the layer has no {missing}, which this {plan.model_type} checkpoint's layer needs")
    params = {name: np.asarray(value) for name, value in values.items()}
    fallback = np.dtype(dtype) if dtype is not None else params["w_gate"].dtype
    dtypes = {name: ckpt.stored_dtype(name) or fallback for name in tensor_names(plan, prefix)}
    return export_arrays(plan, prefix, params, dtypes)


def save_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """Write {name: numpy array} (bfloat16 as jnp.bfloat16) as a .safetensors file, e.g. `export_layer`'s result."""
    _safetensors.save(os.fspath(path), tensors)
