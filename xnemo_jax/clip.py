"""CLIP vision tower (transformers' ``CLIPVisionModelWithProjection``) in Flax NNX, plus CLIP preprocessing.

What is ported: the ViT image encoder of CLIP as transformers implements it — patch embedding (a
``patch_size`` stride-``patch_size`` convolution without bias), a learned class token prepended to the
patch tokens, learned absolute position embeddings, ``pre_layrnorm``, ``num_hidden_layers`` pre-norm
transformer layers (``layer_norm1`` → multi-head self-attention → residual, ``layer_norm2`` → MLP ``fc1`` →
activation → ``fc2`` → residual), ``post_layernorm`` on the class token, and the bias-free
``visual_projection`` giving ``image_embeds`` (what X-NeMo conditions on). :func:`preprocess` reproduces
``CLIPImageProcessor``'s defaults (shortest edge → 224 with PIL bicubic, centre crop, rescale, OpenAI
mean/std) for channels-last uint8 images.

Key-name conventions: module attribute paths mirror transformers' module paths, so a state-dict key such
as ``vision_model.encoder.layers.3.self_attn.q_proj.weight`` is the parameter
``model.vision_model.encoder.layers[3].self_attn.q_proj.weight`` (the layer list is an ``nnx.List``; the
typo ``pre_layrnorm`` is transformers' own name). Layouts follow :mod:`xnemo_jax.layers`: ``Linear``
weights are (in, out), the patch convolution is channels-last (kh, kw, in, out); ``class_embedding`` and
``position_embedding.weight`` have the same layout in both frameworks. The
:meth:`CLIPVisionModelWithProjection.torch_key` hook drops the non-parameter ``position_ids`` buffer that
older transformers versions saved, and the text half of a full ``CLIPModel`` checkpoint, so
:func:`xnemo_jax.convert.load_pretrained` (``kind="clip_vision"``) reads either kind of folder.

Inputs are channels-last pixel values ``(B, H, W, C)``, already normalised, with ``H == W == image_size``.
Parameters are float32; activations run in the ``dtype`` given to :meth:`~CLIPVisionModelWithProjection.from_config`
(layer-norm statistics and the attention softmax stay in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from xnemo_jax import layers

# OpenAI CLIP normalisation constants (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' ACT2FN names for the activations a CLIP config can ask for.
ACTIVATIONS = {
    "quick_gelu": layers.quick_gelu,
    "gelu": lambda x: layers.gelu(x, approximate=False),
    "gelu_new": lambda x: layers.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: layers.gelu(x, approximate=True),
}


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``CLIPVisionConfig`` that shape the model (defaults: transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPVisionConfig:
        """From a ``config.json`` dict: a ``CLIPVisionConfig`` one, or a full ``CLIPConfig`` one (whose
        ``vision_config`` sub-dict describes the tower and whose top-level ``projection_dim`` sizes
        ``visual_projection``). Unknown keys are ignored."""
        config = dict(config)
        if isinstance(config.get("vision_config"), dict):
            vision = dict(config["vision_config"])
            # CLIPModel's visual_projection is sized by the top-level projection_dim (default 512).
            vision["projection_dim"] = config.get("projection_dim", cls.projection_dim)
            config = vision
        out = cls(**layers.config_fields(cls, config))
        if out.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {out.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(f"hidden_size {out.hidden_size} does not split into {out.num_attention_heads} heads")
        return out

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@struct.dataclass
class CLIPVisionOutput:
    """``image_embeds`` (B, projection_dim); ``last_hidden_state`` (B, 1 + N, hidden), the encoder output
    before ``post_layernorm``; ``hidden_states``: with ``output_hidden_states=True``, the encoder input
    (after ``pre_layrnorm``) and every layer's output — ``num_hidden_layers + 1`` arrays, as transformers."""

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


# ----------------------------------------------------------------------------------------------- modules
class CLIPVisionEmbeddings(nnx.Module):
    """Patch tokens plus a class token, plus learned position embeddings (``num_patches + 1`` of them)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        dim = config.hidden_size
        self.image_size, self.patch_size, self.num_channels = config.image_size, config.patch_size, config.num_channels
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (dim,), jnp.float32))
        self.patch_embedding = layers.Conv(config.num_channels, dim, config.patch_size, stride=config.patch_size,
                                           bias=False, rngs=rngs, dtype=dtype)
        self.num_positions = config.num_patches + 1
        self.position_embedding = layers.Embed(self.num_positions, dim, rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, c = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size) or c != self.num_channels:
            raise ValueError(f"pixel values of shape {pixel_values.shape}: the model expects "
                             f"(B, {self.image_size}, {self.image_size}, {self.num_channels}) channels-last input")
        patches = self.patch_embedding(pixel_values)  # (B, H/p, W/p, D): row-major like torch's flatten(2)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding(jnp.arange(self.num_positions))[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections and scale ``head_dim ** -0.5``."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        kw = dict(rngs=rngs, dtype=dtype)
        self.k_proj = layers.Linear(dim, dim, **kw)
        self.v_proj = layers.Linear(dim, dim, **kw)
        self.q_proj = layers.Linear(dim, dim, **kw)
        self.out_proj = layers.Linear(dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731 - (B, L, H, D)
        out = layers.attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), scale=self.scale)
        return self.out_proj(out.reshape(b, n, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.hidden_act = config.hidden_act  # a name (static), looked up in ACTIVATIONS when called
        self.fc1 = layers.Linear(config.hidden_size, config.intermediate_size, rngs=rngs, dtype=dtype)
        self.fc2 = layers.Linear(config.intermediate_size, config.hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, rngs=rngs, dtype=dtype)
        self.layer_norm1 = layers.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(config, rngs=rngs, dtype=dtype)
        self.layer_norm2 = layers.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs, dtype=dtype)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array, *, output_hidden_states: bool = False):
        """The last layer's output and, if asked, the input plus every layer's output."""
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x)
            if states is not None:
                states.append(x)
        return x, (tuple(states) if states is not None else None)


class CLIPVisionTransformer(nnx.Module):
    """transformers' ``CLIPVisionModelWithProjection.vision_model``."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        eps = config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs, dtype=dtype)
        self.pre_layrnorm = layers.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)  # sic: transformers' name
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
        self.post_layernorm = layers.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False):
        """``(last_hidden_state, pooled (B, hidden), hidden_states or None)``."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last, states = self.encoder(x, output_hidden_states=output_hidden_states)
        pooled = self.post_layernorm(last[:, 0])
        return last, pooled, states


class CLIPVisionModelWithProjection(layers.FromConfig, nnx.Module):
    """CLIP image encoder: ``pixel_values (B, H, W, C)`` -> :class:`CLIPVisionOutput` with ``image_embeds``.

    ``from_config`` takes a transformers ``config.json`` dict (``CLIPVisionConfig`` or full ``CLIPConfig``).
    """

    CONFIG = CLIPVisionConfig

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs, dtype=dtype)
        self.visual_projection = layers.Linear(config.hidden_size, config.projection_dim, bias=False, rngs=rngs,
                                               dtype=dtype)

    @staticmethod
    def torch_key(key: str) -> str | None:
        """The parameter path of a transformers state-dict key, or ``None`` for keys that are not parameters
        of this module: the ``position_ids`` buffer, and the text tower / ``logit_scale`` of a ``CLIPModel``."""
        if key.endswith("position_ids"):
            return None
        if key.startswith(("text_model.", "text_projection.")) or key == "logit_scale":
            return None
        return key

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        last, pooled, states = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=last,
                                hidden_states=states)


# ----------------------------------------------------------------------------------------- preprocessing
def _resize_shortest_edge(image: np.ndarray, size: int) -> np.ndarray:
    """PIL bicubic resize so the shorter side is ``size`` (the longer one: ``int(size * long / short)``,
    i.e. floored, like transformers' ``get_resize_output_image_size(default_to_square=False)``)."""
    from PIL import Image  # noqa: PLC0415

    h, w = image.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to ``size`` x ``size``; a side shorter than ``size`` is zero-padded around the image first
    (transformers' ``center_crop``: top/left offsets ``(orig - size) // 2``, padding ``ceil`` on the top/left)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        top, left = -(-ph // 2), -(-pw // 2)
        image = np.pad(image, ((top, ph - top), (left, pw - left), (0, 0)))
        h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def preprocess(images, size: int = 224) -> np.ndarray:
    """CLIPImageProcessor defaults for uint8 RGB images -> ``(B, size, size, 3)`` float32, channels last.

    ``images``: a ``(B, H, W, 3)`` uint8 array or a list of ``(H, W, 3)`` uint8 arrays of any sizes. Each
    is resized (shortest edge -> ``size``, PIL bicubic), centre-cropped to ``size``, scaled by 1/255 and
    normalised with the OpenAI mean/std — the same arithmetic as transformers (float64 rescale, float32
    normalisation), so the result matches ``CLIPImageProcessor()(images)`` to float32 rounding.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {image.dtype} {image.shape}")
        image = _center_crop(_resize_shortest_edge(image, size), size)
        x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32))
    if not out:
        raise ValueError("no images to preprocess")
    return np.stack(out)
