"""Every architecture the installed transformers can build, at tiny sizes, found by walking its auto mappings.

Nobody picks the list: :func:`architectures` walks transformers' auto model mappings (seq2seq and speech
seq2seq LMs, masked LMs, causal LMs, image-text-to-text, image and audio classification), takes each
``model_type`` once (the first task that has it, in that order: an encoder is swept as the encoder it
is, an encoder-decoder with its decoder and cross-attention), and :func:`build` makes it from a tiny
config: every size field the config class has (``hidden_size`` or ``d_model`` or ``n_embd``, layers,
heads, FFN widths, experts, latent ranks, image and audio sizes) shrunk to the values below, nested
sub-configs too. A handful of families need more than shrinking (a hybrid whose attention layers sit at
period 8, a vision backbone with per-stage lists): :data:`OVERRIDES` holds those config values, each
with the reason. What cannot be built is reported with transformers' own error (:class:`BuildError`).

Example::

    >>> from lcpass.zoo.auto import architectures, build
    >>> arch = next(a for a in architectures() if a.model_type == "llama")
    >>> arch.task, arch.class_name
    ('causal-lm', 'LlamaForCausalLM')
    >>> tiny = build(arch)
    >>> sorted(tiny.inputs), tiny.inputs["input_ids"].shape
    (['input_ids'], torch.Size([2, 19]))
"""
from __future__ import annotations

import dataclasses
import inspect as _inspect
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import torch

__all__ = ["Arch", "TinyModel", "BuildError", "TASKS", "OVERRIDES", "TINY", "architectures", "build",
           "MAX_PARAMS", "SEQ", "BATCH"]

# (task, transformers mapping) in the order a model_type is claimed: encoder-decoders as encoder-decoders,
# encoders as encoders, then decoders, then multimodal and the vision / audio encoders.
TASKS: tuple[tuple[str, str], ...] = (
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("audio-classification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
)
GENERATIVE_TASKS = ("seq2seq", "speech-seq2seq", "causal-lm", "image-text-to-text")

SEQ, DECODER_SEQ, BATCH, WINDOW = 19, 7, 2, 8
VOCAB = 256
MAX_PARAMS = 3_000_000  # a tiny config that still builds more than this is reported, not built

# The size every config field of these names gets (when the class has the field and its default is an int).
TINY: dict[str, int] = dict(
    hidden_size=64, d_model=64, n_embd=64, embed_dim=64, dim=64, model_dim=64, hidden_dim=64, word_embed_proj_dim=64,
    num_hidden_layers=2, num_layers=2, n_layer=2, n_layers=2, encoder_layers=2, decoder_layers=2,
    num_decoder_layers=2, num_encoder_layers=2,
    num_attention_heads=4, num_heads=4, n_head=4, n_heads=4, encoder_attention_heads=4, decoder_attention_heads=4,
    num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2, multi_query_group_num=2,
    head_dim=16, d_kv=16, kv_channels=16, attention_head_dim=16,
    intermediate_size=128, d_ff=128, ffn_dim=128, n_inner=128, encoder_ffn_dim=128, decoder_ffn_dim=128,
    ffn_hidden_size=128, mlp_dim=128, dim_feedforward=128, ffn_embed_dim=128,
    vocab_size=VOCAB, max_position_embeddings=128, n_positions=128, n_ctx=128, max_seq_len=128,
    max_target_positions=128, max_source_positions=64, seq_length=128,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, top_k=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, expert_hidden_size=32,
    n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    image_size=32, patch_size=8, num_channels=3, num_mel_bins=16, sliding_window=WINDOW, attention_chunk_size=WINDOW,
    type_vocab_size=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0,
    sep_token_id=2, cls_token_id=1, mask_token_id=3, unk_token_id=3,
    mamba_d_state=8, state_size=8, ssm_state_size=8, mamba_n_heads=4, mamba_d_head=32, mamba_expand=2,
    mamba_d_conv=4, mamba_d_ssm=128, conv_kernel=4, n_mamba_heads=4, mamba_headdim=16, time_step_rank=8,
    num_codebooks=2, projection_dim=32, hidden_size_per_head=16, embedding_size=64, rotary_dim=8,
    d_inner=128, dim_ff=128, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
    encoder_hash_byte_group_vocab=VOCAB, vision_feature_layer=-1, text_hidden_size=64, vision_hidden_size=64,
    query_pre_attn_scalar=16, global_head_dim=16, cross_attention_hidden_size=64, encoder_hidden_size=64,
    num_query_tokens=4, qformer_hidden_size=64, mm_hidden_size=64, audio_hidden_size=64, out_hidden_size=64,
)

# Config values a family needs beyond shrinking, each with the reason; merged over the shrunk values.
OVERRIDES: dict[str, tuple[dict[str, Any], str]] = {
    "jamba": (dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, mamba_dt_rank=8), "attention every 8th layer by default"),
    "whisper": (dict(max_source_positions=16), "input_features must be 2 x max_source_positions frames"),
    "lfm2": (dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
             "the default config has no convolution layer"),
    "bamba": (dict(attn_layer_indices=[1]), "no attention layer among the first two by default"),
    "granitemoehybrid": (dict(layer_types=["mamba", "attention"]), "every default layer is a Mamba layer"),
    "recurrent_gemma": (dict(num_hidden_layers=3), "block_types repeats (recurrent, recurrent, attention)"),
    "nemotron_h": (dict(layers_block_type=["mamba", "attention"]), "the default pattern starts with Mamba layers"),
    "mamba2": (dict(head_dim=32), "its head_dim is the SSM head's: num_heads x head_dim = expand x hidden_size"),
    "swinv2": (dict(embed_dim=16, num_heads=[2, 2, 4, 4], patch_size=4, window_size=4),
               "hierarchical: embed_dim (96) doubles at each of four stages, heads per stage, 7 x 7 windows"),
    "mobilevit": (dict(image_size=128), "at 32 px every attention of its three stages sees one token"),
    "gpt_neo": (dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW),
                "attention_types lists 12 (global, local) pairs by default"),
}

# generation_config fields a family's generate() requires that a config built from scratch lacks
GENERATION_OVERRIDES: dict[str, dict[str, Any]] = {
    # generate(composer="composer1") reads the token of each of its config.composer_vocab_size composers
    "pop2piano": {"composer_to_feature_token": {f"composer{i + 1}": 4 + i for i in range(21)}},
}


@dataclass(frozen=True)
class Arch:
    """One architecture of the sweep: a model_type, the task it is swept as, and the class that builds it."""

    model_type: str
    task: str
    class_name: str

    @property
    def generative(self) -> bool:
        return self.task in GENERATIVE_TASKS


@dataclass
class TinyModel:
    """A built architecture: the module (eval, fp32, seeded weights) and one forward's keyword inputs."""

    arch: Arch
    model: torch.nn.Module
    inputs: dict[str, Any]
    attn_impl: str
    n_params: int
    notes: list[str] = field(default_factory=list)


class BuildError(RuntimeError):
    """An architecture the sweep cannot build from a tiny config; the message is transformers' reason."""


@lru_cache(maxsize=1)
def architectures() -> tuple[Arch, ...]:
    """Every (model_type, task, class) of the installed transformers' auto mappings, each model_type once."""
    from transformers.models.auto import modeling_auto

    seen: dict[str, Arch] = {}
    for task, mapping in TASKS:
        for model_type, cls in getattr(modeling_auto, mapping, {}).items():
            name = cls if isinstance(cls, str) else cls[0]
            if model_type not in seen:
                seen[model_type] = Arch(model_type, task, name)
    return tuple(sorted(seen.values(), key=lambda a: a.model_type))


def _fields(cls: type) -> dict[str, Any]:
    """The config class's fields and their defaults (dataclass configs, or the __init__ signature)."""
    out: dict[str, Any] = {}
    try:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = None
    except TypeError:
        for name, p in _inspect.signature(cls.__init__).parameters.items():
            if name not in ("self", "kwargs"):
                out[name] = None if p.default is _inspect.Parameter.empty else p.default
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _default(config_cls: type) -> Any:
    """The class's default instance (to read sub-config classes and per-layer lists), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config_cls()
    except Exception:  # noqa: BLE001 - some configs need arguments; shrinking then works from fields only
        return None


def _get(config: Any, name: str, default: Any = None) -> Any:
    """An attribute of a config, or ``default`` (also where a config refuses a global read of a per-layer one)."""
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError
        return default


def _n_layers(config: Any) -> Optional[int]:
    for name in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        v = _get(config, name)
        if _is_int(v) and v > 0:
            return int(v)
    return None


def _per_layer_lists(config: Any, fields: dict[str, Any]) -> dict[str, list]:
    """Per-layer lists of the default config (as long as its layer count), cut to the fewest layers that
    keep one layer of every kind they list: a hybrid keeps its attention and its recurrent layers."""
    n = _n_layers(config) if config is not None else None
    if not n or n <= 2:
        return {}
    lists = {k: list(v) for k, v in vars(config).items()
             if k in fields and isinstance(v, (list, tuple)) and len(v) == n and k != "id2label"}
    if not lists:
        return {}
    keep: list[int] = []
    for values in lists.values():
        seen: dict[Any, int] = {}
        for i, x in enumerate(values):
            try:
                seen.setdefault(x, i)
            except TypeError:  # unhashable entries: keep the first two layers
                seen.setdefault(i, i) if i < 2 else None
        keep.extend(seen.values())
    idx = sorted(set(keep))[:4]
    while len(idx) < 2:
        idx = sorted(set(idx) | {len(idx)})
    return {k: type(v)(v[i] for i in idx) if isinstance(v, tuple) else [v[i] for i in idx] for k, v in lists.items()}


_LIST_SIZES = {"conv_dim": 32, "hidden_sizes": 32, "embed_dim": 32, "embed_dims": 32, "dims": 32,
               "depths": 1, "depth": 1, "block_sizes": 1, "num_heads": 2, "num_attention_heads": 2}


def tiny_kwargs(config_cls: type, depth: int = 0) -> dict[str, Any]:
    """Constructor keywords that shrink ``config_cls`` (and its sub-configs) to the :data:`TINY` sizes."""
    fields = _fields(config_cls)
    aliases = dict(getattr(config_cls, "attribute_map", {}) or {})
    default = _default(config_cls) if depth < 3 else None
    out: dict[str, Any] = {}
    for name, value in TINY.items():
        real = aliases.get(name, name)
        if real not in fields:
            continue
        current = fields[real] if default is None else _get(default, real, fields[real])
        if current is None or _is_int(current):
            out[real] = value
    for name, size in _LIST_SIZES.items():
        real = aliases.get(name, name)
        current = fields.get(real) if default is None else _get(default, real, fields.get(real))
        if isinstance(current, (list, tuple)) and current and all(_is_int(x) for x in current):
            shrunk = [min(int(x), size) if name.endswith("heads") else size for x in current]
            out[real] = type(current)(shrunk)
    layers = _per_layer_lists(default, fields)
    if layers:
        out.update(layers)
        n = len(next(iter(layers.values())))
        for name in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
            if aliases.get(name, name) in fields:
                out[aliases.get(name, name)] = n
    for sub, sub_cls in (getattr(config_cls, "sub_configs", {}) or {}).items():
        if depth >= 2:
            continue
        sub_obj = _get(default, sub) if default is not None else None
        real_cls = type(sub_obj) if sub_obj is not None and hasattr(sub_obj, "to_dict") else sub_cls
        if not isinstance(real_cls, type) or not hasattr(real_cls, "model_type"):
            continue
        kw = tiny_kwargs(real_cls, depth + 1)
        if getattr(real_cls, "model_type", ""):
            kw["model_type"] = real_cls.model_type
        out[sub] = kw
    return out


def _fix_rope(config: Any, depth: int = 0) -> None:
    """Multimodal RoPE sections sized for the default head_dim: rescale them to the tiny one."""
    rope = _get(config, "rope_parameters")
    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim") or (
        hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else None)
    if isinstance(rope, dict) and "mrope_section" not in rope and "mrope_section" in (
            getattr(type(config), "ignore_keys_at_rope_validation", None) or ()):
        rope["mrope_section"] = [16, 24, 24]  # Qwen2-VL's modeling default, sized for head_dim 128
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and head_dim:
        sec = rope["mrope_section"]
        half = int(head_dim) // 2
        new = [max(1, round(x * half / sum(sec))) for x in sec]
        new[0] += half - sum(new)
        rope["mrope_section"] = new
    if depth < 2:
        for sub in getattr(config, "sub_configs", {}) or {}:
            child = getattr(config, sub, None)
            if child is not None and hasattr(child, "to_dict"):
                _fix_rope(child, depth + 1)


def _inputs(model: torch.nn.Module, arch: Arch) -> dict[str, Any]:
    """The main input, plus any token ids the forward requires besides (BLIP-2's ``input_ids`` next to
    its ``pixel_values``, InstructBLIP's ``qformer_input_ids``)."""
    import inspect

    out = _main_inputs(model, arch)
    gen = torch.Generator().manual_seed(3)
    text = getattr(model.config, "text_config", None) or model.config
    vocab = min(int(getattr(text, "vocab_size", None) or VOCAB), VOCAB)
    for p in inspect.signature(model.forward).parameters.values():
        if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in out \
                and p.name.endswith("input_ids"):
            n = DECODER_SEQ if p.name.startswith("decoder") else SEQ
            out[p.name] = torch.randint(4, vocab, (BATCH, n), generator=gen)
    return out


def _main_inputs(model: torch.nn.Module, arch: Arch) -> dict[str, Any]:
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(1)
    text = getattr(config, "text_config", None) or config
    vocab = int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB)
    if name == "input_ids":
        ids = torch.randint(4, min(vocab, VOCAB), (BATCH, SEQ), generator=gen)
        out: dict[str, Any] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = torch.randint(4, min(vocab, VOCAB), (BATCH, DECODER_SEQ), generator=gen)
        return out
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else int(size[0])
        channels = int(getattr(vision, "num_channels", 3) or 3)
        return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=gen)}
    if name == "input_values":
        return {"input_values": torch.randn(BATCH, 4000, generator=gen)}
    if name == "input_features":
        bins = int(getattr(config, "num_mel_bins", 16) or 16)
        frames = 2 * int(getattr(config, "max_source_positions", 16) or 16)
        out = {"input_features": torch.randn(BATCH, bins, frames, generator=gen)}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = torch.randint(4, min(vocab, VOCAB), (BATCH, DECODER_SEQ), generator=gen)
        return out
    raise BuildError(f"{arch.class_name}: no tiny inputs for main_input_name={name!r}")


_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
_HEAD_KEYS = ("head_dim", "d_kv", "kv_channels", "attention_head_dim")


def _variants(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The tiny config, then without GQA (MLA and other designs that need KV heads = heads), then also
    without an explicit head_dim (left to the config)."""
    def mha(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (mha(v) if isinstance(v, dict) else TINY["num_attention_heads"] if k in _KV_KEYS else v)
                for k, v in d.items()}

    def drop(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: (drop(v, keys) if isinstance(v, dict) else v) for k, v in d.items() if k not in keys}

    return [kwargs, mha(kwargs), drop(mha(kwargs), _HEAD_KEYS)]


def build(arch: Arch, attn_implementation: Optional[str] = None) -> TinyModel:
    """``arch`` from a tiny config, with ``attn_implementation`` (None: transformers' default choice).

    The model is first built on the meta device to count its parameters: a config that stays larger than
    :data:`MAX_PARAMS` after shrinking is a :class:`BuildError` rather than minutes of initialisation.
    A config whose model fails its first forward is retried without GQA, then without a head_dim; the
    first that runs is the sweep's. Raises :class:`BuildError` with transformers' reason otherwise.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model_cls = getattr(transformers, arch.class_name)
        config_cls = CONFIG_MAPPING[arch.model_type]
        own = getattr(model_cls, "config_class", None)
        if isinstance(own, type) and issubclass(own, transformers.PretrainedConfig) and own is not config_cls \
                and own is not transformers.PretrainedConfig:
            config_cls = own  # Llama4ForCausalLM is mapped from "llama4" but takes the text config
        base = tiny_kwargs(config_cls)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"{arch.class_name}: {type(exc).__name__}: {_line(exc)}") from exc
    base.update(OVERRIDES.get(arch.model_type, ({}, ""))[0])
    first: Optional[BuildError] = None
    for kwargs in _variants(base):
        try:
            return _build_one(arch, config_cls, model_cls, kwargs, attn_implementation)
        except BuildError as exc:
            first = first or exc
            if "parameters" in str(exc) and "tiny config" in str(exc):
                break
    assert first is not None
    raise first


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])[:240] if lines else type(exc).__name__


def _build_one(arch: Arch, config_cls: type, model_cls: type, kwargs: dict[str, Any],
               attn_implementation: Optional[str]) -> TinyModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = config_cls(**kwargs)
            _fix_rope(config)
            with torch.device("meta"):
                meta = model_cls._from_config(config, attn_implementation=attn_implementation)
            n_params = sum(p.numel() for p in meta.parameters())
            if n_params > MAX_PARAMS:
                big = max(meta.named_parameters(), key=lambda kv: kv[1].numel())
                raise BuildError(f"{arch.class_name}: the tiny config still has {n_params:,} parameters "
                                 f"(> {MAX_PARAMS:,}; largest {big[0]} {tuple(big[1].shape)}): a size field it has "
                                 f"is not among lcpass.zoo.auto.TINY")
            torch.manual_seed(0)
            model = model_cls._from_config(config, attn_implementation=attn_implementation)
            model = model.to(torch.float32).eval()
            woken = _wake_zero_weights(model)
            inputs = _inputs(model, arch)
            with torch.no_grad():
                model(**inputs)
    except BuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own reason is the report
        raise BuildError(f"{arch.class_name}: {type(exc).__name__}: {_line(exc)}") from exc
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.use_cache = True
        if getattr(model.config, "is_encoder_decoder", False) and gc.decoder_start_token_id is None:
            gc.decoder_start_token_id = TINY["decoder_start_token_id"]
        if gc.pad_token_id is None:
            gc.pad_token_id = TINY["pad_token_id"]
        for key, value in GENERATION_OVERRIDES.get(arch.model_type, {}).items():
            setattr(gc, key, value)
    notes = [f"zero-initialised weights drawn at random: {', '.join(woken)}"] if woken else []
    return TinyModel(arch, model, inputs, impl, n_params, notes)


def _wake_zero_weights(model: torch.nn.Module) -> list[str]:
    """Draw the matrices a family initialises to zero (NeoMME's attention output projection, ReZero-style
    residual gates) at random, as training would have: at zero the attention cannot reach the output, and
    the sweep could not tell a method that runs from one that does not."""
    gen = torch.Generator().manual_seed(2)
    woken = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.is_floating_point() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                woken.append(name)
    return woken
