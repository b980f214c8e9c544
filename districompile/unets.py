"""UNet architectures as ``diffusers.UNet2DConditionModel`` configs: SDXL's, full size or scaled
down, and a tiny SD-1.5; SDXL's VAE (``diffusers.AutoencoderKL``), full size or tiny; FLUX.1-dev's
transformer (``diffusers.FluxTransformer2DModel``), full size or tiny; and one small trained
UNet2DModel.

No weights can be downloaded where districompile's examples, benchmarks and tests run, so they
build these architectures with random weights. Here are the configs and SDXL's micro-conditioning
input, written once. The exception is ``trained_shapes_unet()``, trained here on the CPU
(examples/train_tiny.py), its weights shipped in the package (docs/QUALITY.md).
"""

from __future__ import annotations

from pathlib import Path

import torch


def sdxl_config(
    widths=(320, 640, 1280),
    layers_per_block: int = 2,
    transformer_layers=(1, 2, 10),
    heads=(5, 10, 20),
    text_dim: int = 2048,
    pooled_dim: int = 1280,
    time_embed_dim: int = 256,
    groups: int = 32,
) -> dict:
    """SDXL's block types and text_time conditioning; the defaults are SDXL's own sizes.

    ``heads`` goes to ``attention_head_dim``, which diffusers reads as the number of heads.
    """
    return dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=tuple(transformer_layers),
        attention_head_dim=tuple(heads),
        use_linear_projection=True,
        cross_attention_dim=text_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # Six time ids, each embedded to time_embed_dim, concatenated with the pooled text embedding.
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        norm_num_groups=groups,
    )


SDXL = sdxl_config()
# Scaled down for CPU runs: every level, block type and conditioning path of SDXL, at widths of 32-64.
TINY_SDXL = sdxl_config(
    widths=(32, 64, 64), layers_per_block=1, transformer_layers=(1, 1, 2), heads=(2, 4, 4),
    text_dim=32, pooled_dim=32, time_embed_dim=8, groups=8,
)


def pooled_dim(config: dict) -> int:
    """The width of the pooled text embedding (``text_embeds``) a text_time config takes."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def sdxl_time_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning for a latent of ``height`` x ``width``: original size, crop
    corner and target size, in pixels (8 per latent row or column)."""
    pixel_h, pixel_w = 8 * height, 8 * width
    return torch.tensor([[pixel_h, pixel_w, 0, 0, pixel_h, pixel_w]] * batch, device=device, dtype=dtype)


def sdxl_unet(config: dict, size: int, batch: int, dtype=torch.float32, device="cpu"):
    """An SDXL-layout ``UNet2DConditionModel`` of ``config`` with random weights and its inputs for
    ``size`` x ``size`` pixels: ``(unet, args, kwargs)``, called ``unet(*args, **kwargs)``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute on the CPU
        unet = UNet2DConditionModel(**config).to(dtype).eval()
    latent = size // 8
    args = (
        torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
        torch.tensor(500.0, device=device),
        torch.randn(batch, 77, config["cross_attention_dim"], device=device, dtype=dtype),
    )
    added = {
        "text_embeds": torch.randn(batch, pooled_dim(config), device=device, dtype=dtype),
        "time_ids": sdxl_time_ids(batch, latent, latent, device, dtype),
    }
    return unet, args, {"added_cond_kwargs": added}


# SD-1.5's layout (cross-attention on the text from the first level, no text_time conditioning), tiny.
TINY_SD15 = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


# A small pixel-space UNet2DModel trained here (examples/train_tiny.py) on procedurally drawn
# shapes at 32x32: three levels (two downsamplings), self-attention at the lower two, GroupNorm.
SHAPES_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
    norm_num_groups=8,
)
SHAPES_WEIGHTS = Path(__file__).parent / "weights" / "shapes_unet.safetensors"


def trained_shapes_unet():
    """The trained shapes UNet (``SHAPES_UNET`` with the shipped weights), in eval mode.

    An epsilon-predicting DDPM model for images in [-1, 1] on diffusers' default linear noise
    schedule: sample it with ``DDIMScheduler()`` (defaults), at 32x32 or larger.
    """
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    unet = UNet2DModel(**SHAPES_UNET)
    unet.load_state_dict(load_file(SHAPES_WEIGHTS))
    return unet.eval()


def sample_shapes(unet, noise, steps: int = 50):
    """Images in [-1, 1] from ``noise`` by DDIM on the shapes UNet's training schedule
    (``DDIMScheduler()``'s defaults, x0 clipped); ``unet`` may be compiled."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    image = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            image = scheduler.step(unet(image, t).sample, t, image).prev_sample
    return image.clamp(-1, 1)


# SDXL's VAE (``diffusers.AutoencoderKL``, stabilityai/sdxl-vae's config): 8x down to 4 latent channels.
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# Scaled down for CPU runs: SDXL's VAE layout at widths of 8-16; tiled decode tiles above 32 pixels.
TINY_VAE = {**SDXL_VAE, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32}


# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev's config): 11.9B parameters, 22.2 GiB in
# bf16. Guidance-distilled: the guidance scale is an input, and a call has no CFG pair (batch 1).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Scaled down for CPU runs: FLUX.1-dev's layout (double and single blocks, guidance, 3-axis RoPE) at width 32.
TINY_FLUX = {
    **FLUX_DEV, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (4, 6, 6),
}
FLUX_TEXT_TOKENS = 512  # FLUX.1-dev's T5 prompt length (FluxPipeline's max_sequence_length)
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def flux_transformer(config: dict, size: int, batch: int = 1, dtype=torch.float32, device="cpu"):
    """A guidance-distilled ``FluxTransformer2DModel`` of ``config`` with random weights and its
    inputs for ``size`` x ``size`` pixels as FluxPipeline passes them: ``(transformer, args, kwargs,
    token_grids)``, called ``transformer(*args, **kwargs)``; ``token_grids`` is the backend option
    that names the packed tokens' grid.

    The latent (``size / 8`` square, 16 channels) packed in 2 x 2 patches: ``(size / 16)**2``
    tokens of 64 channels; 512 text tokens; the timestep in [0, 1]. The default initialization
    keeps the activations bounded: FLUX.1-dev's 57 blocks narrowed to 2 heads, in bf16, keep the
    hidden states' standard deviation at about 0.6 from the first block to the last.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    # Built in ``dtype`` on the device: FLUX.1-dev initializes there in seconds, with no float32
    # copy (44 GiB) on the way.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    grid = size // 16  # the VAE's 8x, then 2 x 2 latent pixels per token
    args = (torch.randn(batch, grid * grid, config["in_channels"], device=device, dtype=dtype),)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, FLUX_TEXT_TOKENS, config["joint_attention_dim"], device=device, dtype=dtype),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, grid, grid, device, dtype),
        "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, device=device, dtype=dtype),
        "guidance": torch.full((batch,), FLUX_GUIDANCE, device=device),
    }
    return transformer, args, kwargs, {"hidden_states": (grid, grid), "img_ids": (grid, grid)}
