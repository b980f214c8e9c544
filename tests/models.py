"""Tiny seeded UNets for tests: each factory returns ``(model, args, kwargs)``.

Heights and widths are the model's input (latent) sizes. Weights and inputs come from a fixed
seed, so every rank that calls a factory builds the same model and the same inputs.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from districompile.unets import TINY_SD15, TINY_SDXL, pooled_dim, sdxl_time_ids

SEED = 0


@contextlib.contextmanager
def _seeded():
    # Fork so that building a model leaves the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def as_tensor(output):
    """The sample tensor of any factory model's output (diffusers returns a dataclass)."""
    return output if isinstance(output, torch.Tensor) else output.sample


# ----------------------------------------------------------------------------- diffusers
# diffusers is imported inside the factories: importing it takes seconds, which every spawned
# rank running only the hand-written models would otherwise pay.


def tiny_sd15_unet(height=32, width=32, batch=1):
    from diffusers import UNet2DConditionModel

    with _seeded():
        model = UNet2DConditionModel(sample_size=(height, width), **TINY_SD15).eval()
        args = (
            torch.randn(batch, 4, height, width),
            torch.tensor(500),
            torch.randn(batch, 7, TINY_SD15["cross_attention_dim"]),
        )
    return model, args, {}


def tiny_sdxl_unet(height=32, width=32, batch=1):
    return _sdxl_layout_unet(TINY_SDXL, height, width, batch)


def _sdxl_layout_unet(config: dict, height: int, width: int, batch: int):
    """A seeded UNet2DConditionModel of an SDXL-layout ``config`` and its inputs (text_time conditioning)."""
    from diffusers import UNet2DConditionModel

    with _seeded():
        model = UNet2DConditionModel(sample_size=(height, width), **config).eval()
        args = (
            torch.randn(batch, 4, height, width),
            torch.tensor(500),
            torch.randn(batch, 7, config["cross_attention_dim"]),
        )
        kwargs = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, pooled_dim(config)),
                "time_ids": sdxl_time_ids(batch, height, width),
            }
        }
    return model, args, kwargs


def micro_sd_unet(height=8, width=8, batch=1):
    """The smallest UNet2DConditionModel: one level (a ResNet and a transformer block: GroupNorm,
    self-attention through SDPA, cross-attention, GEGLU; then two ResNets up), no mid block, no
    resampling, for the Inductor cases, which compile every kernel on a CPU (seconds each)."""
    from diffusers import UNet2DConditionModel

    with _seeded():
        model = UNet2DConditionModel(
            sample_size=(height, width),
            in_channels=4,
            out_channels=4,
            block_out_channels=(16,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("UpBlock2D",),
            mid_block_type=None,
            cross_attention_dim=16,
            attention_head_dim=8,
            norm_num_groups=4,
        ).eval()
        args = (torch.randn(batch, 4, height, width), torch.tensor(500), torch.randn(batch, 5, 16))
    return model, args, {}


# SDXL's layout at its smallest: two levels (a downsampling and an upsampling convolution), the
# second with transformer blocks (linear projections, SDPA self-attention, cross-attention),
# text_time conditioning; no mid block. A third of the tiny SDXL UNet's nodes.
MICRO_SDXL = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": None,
    "transformer_layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 16,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 6 * 4 + 8,
    "norm_num_groups": 4,
}


def micro_sdxl_unet(height=16, width=8, batch=1):
    """A UNet2DConditionModel of ``MICRO_SDXL``, for the tests that run many configurations of one."""
    return _sdxl_layout_unet(MICRO_SDXL, height, width, batch)


def tiny_unet2d(height=32, width=32, batch=1):
    from diffusers import UNet2DModel

    with _seeded():
        model = UNet2DModel(
            sample_size=(height, width),
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        ).eval()
        args = (torch.randn(batch, 3, height, width), torch.tensor(500))
    return model, args, {}


def tiny_controlnet(height=32, width=32, batch=1):
    """A tiny SD-1.5-like UNet and a ControlNet made from it (conditioning image at 8x the latent):
    ``(unet, controlnet, (sample, timestep, text), conditioning image)``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with _seeded():
        unet = UNet2DConditionModel(sample_size=(height, width), **TINY_SD15).eval()
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16)).eval()
        # A new ControlNet's output convolutions are zero (it starts as a no-op): give them weights.
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
        for parameter in (p for conv in zero_convs for p in conv.parameters()):
            torch.nn.init.normal_(parameter, std=0.1)
        args = (
            torch.randn(batch, 4, height, width),
            torch.tensor(500),
            torch.randn(batch, 7, TINY_SD15["cross_attention_dim"]),
        )
        image = torch.randn(batch, 3, 8 * height, 8 * width)
    return unet, controlnet, args, image


def tiny_unet3d(height=16, width=16, batch=1, frames=3):
    """A video UNet: samples (B, C, frames, H, W), temporal convolutions and attention. One level
    (frames fold into the batch: its resampling would be 2-d), the spatial and temporal transformers
    in the mid block."""
    from diffusers import UNet3DConditionModel

    with _seeded():
        model = UNet3DConditionModel(
            sample_size=(height, width),
            block_out_channels=(32,),
            layers_per_block=1,
            down_block_types=("DownBlock3D",),
            up_block_types=("UpBlock3D",),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ).eval()
        args = (torch.randn(batch, 4, frames, height, width), torch.tensor(500), torch.randn(batch, 7, 32))
    return model, args, {}


def tiny_svd_unet(height=16, width=16, batch=1, frames=3):
    """Stable Video Diffusion's UNet: samples (B, frames, C, H, W), image embeddings, added time ids.
    One level, the spatio-temporal transformer in the mid block."""
    from diffusers import UNetSpatioTemporalConditionModel

    with _seeded():
        model = UNetSpatioTemporalConditionModel(
            sample_size=(height, width),
            in_channels=8,
            out_channels=4,
            block_out_channels=(32,),
            layers_per_block=1,
            down_block_types=("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",),
            cross_attention_dim=32,
            num_attention_heads=(2,),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            num_frames=frames,
        ).eval()
        args = (
            torch.randn(batch, frames, 8, height, width),
            torch.tensor(500.0),
            torch.randn(batch, 1, 32),
            torch.randn(batch, 3),
        )
    return model, args, {}


def _simple_cross_attention_unet(**config):
    """UNet2DConditionModel with SimpleCrossAttn blocks: added-K/V attention, whose keys and values
    are the text's projections followed by the image's."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        attention_head_dim=8,
        norm_num_groups=8,
        **config,
    ).eval()


def tiny_if_unet(height=16, width=16, batch=1):
    """DeepFloyd-IF-like: pixels in, text embeddings projected (encoder_hid_dim), added-K/V attention."""
    with _seeded():
        model = _simple_cross_attention_unet(
            sample_size=(height, width), in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=24,
            addition_embed_type="text", addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift",
        )
        args = (torch.randn(batch, 3, height, width), torch.tensor(500), torch.randn(batch, 7, 24))
    return model, args, {}


def tiny_kandinsky_unet(height=16, width=16, batch=1):
    """Kandinsky-2.2-decoder-like: conditioned on an image embedding (no text), added-K/V attention."""
    with _seeded():
        model = _simple_cross_attention_unet(
            sample_size=(height, width), in_channels=4, out_channels=8, cross_attention_dim=32, encoder_hid_dim=16,
            encoder_hid_dim_type="image_proj", addition_embed_type="image",
        )
        args = (torch.randn(batch, 4, height, width), torch.tensor(500), None)
        kwargs = {"added_cond_kwargs": {"image_embeds": torch.randn(batch, 16)}}
    return model, args, kwargs


# ----------------------------------------------------------------------------- diffusion transformers
# Tiny configs of diffusers' transformers (random weights): the text encoders' outputs are passed
# directly as prompt embeddings. Latents of 16 x 16 with 2 x 2 patches: an 8 x 8 token grid.


def tiny_sd3_transformer(height=16, width=16, batch=1):
    """SD3's MMDiT: joint attention over the image tokens followed by the text tokens, a positional
    table of 12 x 12 patches cropped to the grid (``pos_embed_max_size``), AdaLN-Zero modulation."""
    from diffusers import SD3Transformer2DModel

    with _seeded():
        model = SD3Transformer2DModel(
            sample_size=height, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
            pos_embed_max_size=12,
        ).eval()
        args = (torch.randn(batch, 4, height, width),)
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, 7, 24),
            "pooled_projections": torch.randn(batch, 12),
            "timestep": torch.tensor([500] * batch),
        }
    return model, args, kwargs


def tiny_pixart_transformer(height=16, width=16, batch=1):
    """PixArt-alpha/sigma's DiT: self-attention on the image tokens, cross-attention to the caption,
    AdaLN-single modulation, a sinusoidal positional embedding of the grid."""
    from diffusers import PixArtTransformer2DModel

    with _seeded():
        model = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, sample_size=height, patch_size=2, caption_channels=24,
        ).eval()
        args = (torch.randn(batch, 4, height, width),)
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, 7, 24),
            "timestep": torch.tensor([500] * batch),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    return model, args, kwargs


def tiny_flux_transformer(height=16, width=16, batch=1):
    """Flux: latents packed as 2 x 2 patches into tokens (B, H/2 * W/2, 4 * C) with their grid
    positions in ``img_ids`` (rotary embeddings), double- and single-stream blocks."""
    from diffusers import FluxTransformer2DModel

    grid_h, grid_w = height // 2, width // 2
    with _seeded():
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4),
        ).eval()
        img_ids = torch.zeros(grid_h, grid_w, 3)
        img_ids[..., 1] = torch.arange(grid_h)[:, None]
        img_ids[..., 2] = torch.arange(grid_w)[None, :]
        args = (torch.randn(batch, grid_h * grid_w, 16),)
        kwargs = {
            "encoder_hidden_states": torch.randn(batch, 7, 24),
            "pooled_projections": torch.randn(batch, 12),
            "timestep": torch.tensor([0.5] * batch),
            "img_ids": img_ids.reshape(grid_h * grid_w, 3),
            "txt_ids": torch.zeros(7, 3),
        }
    return model, args, kwargs


# ----------------------------------------------------------------------------- hand-written


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as in the original SD code."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class HandUNetA(nn.Module):
    """UNet with a learned full-size positional map, einsum/bmm attention and bilinear upsampling.

    Inputs: ``x`` (B, 4, height, width) and a context (B, T, context_dim) for cross-attention.
    """

    def __init__(self, height, width, channels=16, context_dim=16):
        super().__init__()
        c = channels
        self.conv_in = nn.Conv2d(4, c, 5, padding=2)
        self.pos = nn.Parameter(0.1 * torch.randn(1, c, height, width))
        self.norm0 = Float32GroupNorm(4, c)
        self.dilated = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm1 = Float32GroupNorm(4, 2 * c)
        self.reflect = nn.Conv2d(2 * c, 2 * c, 3, padding=1, padding_mode="reflect")
        self.to_qkv = nn.Linear(2 * c, 3 * 2 * c)
        self.to_q_cross = nn.Linear(2 * c, 2 * c)
        self.to_kv_cross = nn.Linear(context_dim, 2 * 2 * c)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(2 * c, 4, 3, padding=1)

    def forward(self, x, context):
        h0 = self.conv_in(x) + self.pos
        h0 = h0 + self.dilated(F.silu(self.norm0(h0)))

        h = self.down(h0)
        h = h + self.reflect(F.silu(self.norm1(h)))
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        tokens = tokens + self._self_attention(tokens)
        tokens = tokens + self._cross_attention(tokens, context)
        h = tokens.transpose(1, 2).reshape(b, c, height, width)

        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        h = F.silu(self.up(h))
        return self.conv_out(torch.cat([h, h0], dim=1))

    def _self_attention(self, tokens):
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        scores = torch.einsum("bnc,bmc->bnm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bnm,bmc->bnc", scores.softmax(dim=-1), v)

    def _cross_attention(self, tokens, context):
        q = self.to_q_cross(tokens)
        k, v = self.to_kv_cross(context).chunk(2, dim=-1)
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        return torch.bmm(scores.softmax(dim=-1), v)


class HandUNetB(nn.Module):
    """UNet with pooling downsamples, transposed-conv/nearest upsampling, SDPA attention,
    a row-sinusoidal positional encoding and a global squeeze-excite gate.

    Inputs: ``x`` (B, 3, H, W) and a timestep per sample (B,).
    """

    def __init__(self, channels=16, heads=2):
        super().__init__()
        c = channels
        self.heads = heads
        self.conv_in = nn.Conv2d(3, c, 3, padding=1, padding_mode="replicate")
        self.time_mlp = nn.Sequential(nn.Linear(1, c), nn.SiLU(), nn.Linear(c, c))
        self.down1 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.down2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.norm = nn.LayerNorm(2 * c)
        self.to_qkv = nn.Linear(2 * c, 3 * 2 * c)
        self.attn_out = nn.Linear(2 * c, 2 * c)
        self.squeeze = nn.Conv2d(2 * c, c // 2, 1)
        self.excite = nn.Conv2d(c // 2, 2 * c, 1)
        self.up1 = nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1)
        self.merge1 = nn.Conv2d(4 * c, c, 3, padding=1)
        self.merge0 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x, timestep):
        h0 = self.conv_in(x)
        h0 = h0 + self.time_mlp(timestep[:, None] / 1000)[:, :, None, None]
        h0 = h0 + _row_encoding(h0)

        h1 = F.silu(self.down1(F.avg_pool2d(h0, 2)))
        h = F.silu(self.down2(F.max_pool2d(h1, 2)))
        h = h + self._attention(h)
        gate = self.excite(F.silu(self.squeeze(h.mean(dim=(2, 3), keepdim=True)))).sigmoid()
        h = h * gate

        h = F.silu(self.merge1(torch.cat([self.up1(h), h1], dim=1)))
        h = F.interpolate(h, size=h0.shape[-2:], mode="nearest")
        h = F.silu(self.merge0(torch.cat([h, h0], dim=1)))
        return self.conv_out(h)

    def _attention(self, h):
        b, c, height, width = h.shape
        tokens = self.norm(h.flatten(2).transpose(1, 2))  # LayerNorm over channels
        q, k, v = (
            t.reshape(b, height * width, self.heads, c // self.heads).permute(0, 2, 1, 3)
            for t in self.to_qkv(tokens).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.attn_out(out.permute(0, 2, 1, 3).reshape(b, height * width, c))
        return out.transpose(1, 2).reshape(b, c, height, width)


class MicroUNet(nn.Module):
    """The smallest UNet with every exchange kind: conv halos (stride 1 and 2), GroupNorm
    statistics, self-attention K/V (einsum and softmax, unlike diffusers' SDPA) and a spatial
    mean (an all-reduce); a handful of kernels, so Inductor compiles it in seconds on a CPU.

    Inputs: ``x`` (B, 4, H, W), H a multiple of 2, and a timestep: a scalar or one per sample.
    """

    def __init__(self, channels=8):
        super().__init__()
        c = channels
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.time = nn.Linear(1, c)
        self.norm = nn.GroupNorm(2, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.qkv = nn.Linear(c, 3 * c)
        self.gate = nn.Linear(c, c)
        self.conv_out = nn.Conv2d(2 * c, 4, 3, padding=1)

    def forward(self, x, timestep):
        return self.body(self.stem(x, timestep))

    def stem(self, x, timestep):
        return self.conv_in(x) + self.time(timestep.reshape(-1, 1) / 1000)[:, :, None, None]

    def body(self, h0):
        h = self.down(F.silu(self.norm(h0)))
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        weights = (torch.einsum("bnc,bmc->bnm", q, k) / math.sqrt(c)).softmax(dim=-1)
        tokens = tokens + torch.einsum("bnm,bmc->bnc", weights, v)
        tokens = tokens * torch.sigmoid(self.gate(tokens.mean(dim=1)))[:, None]
        h = tokens.transpose(1, 2).reshape(b, c, height, width)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.conv_out(torch.cat([h, h0], dim=1))


class ADMAttention(nn.Module):
    """guided-diffusion's attention block: a 1x1 conv1d makes q, k, v from the flattened tokens,
    scores by einsum over (batch x heads, channels, tokens)."""

    def __init__(self, channels, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        tokens = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(tokens)).reshape(b * self.heads, 3 * c // self.heads, -1)
        q, k, v = qkv.chunk(3, dim=1)
        scale = (c // self.heads) ** -0.25
        weights = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
        out = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
        return x + self.proj_out(out).reshape(b, c, *spatial)


class ADMUNet(nn.Module):
    """A guided-diffusion (ADM) style UNet: scale-shift time conditioning, ADM attention at two
    resolutions, strided-conv downsampling and nearest upsampling."""

    def __init__(self, c=16):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, 2 * c), nn.SiLU(), nn.Linear(2 * c, 2 * c))
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm_in = nn.GroupNorm(4, c)
        self.conv_mid = nn.Conv2d(c, c, 3, padding=1)
        self.attn_high = ADMAttention(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.attn_low = ADMAttention(2 * c)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(2 * c, 3, 3, padding=1)

    def forward(self, x, timestep):
        scale, shift = self.time(timestep.reshape(-1, 1) / 1000).chunk(2, dim=-1)
        h0 = self.conv_in(x)
        h0 = h0 + self.conv_mid(F.silu(self.norm_in(h0) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]))
        h0 = self.attn_high(h0)
        h = self.attn_low(self.down(h0))
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(torch.cat([h, h0], dim=1))


def adm_unet(height=16, width=16, batch=1):
    with _seeded():
        model = ADMUNet().eval()
        args = (torch.randn(batch, 3, height, width), torch.full((batch,), 500.0))
    return model, args, {}


def micro_unet(height=12, width=8, batch=1):
    with _seeded():
        model = MicroUNet().eval()
        args = (torch.randn(batch, 4, height, width), torch.tensor(500.0))
    return model, args, {}


def _row_encoding(x):
    """Sinusoidal encoding of the absolute row index of ``x``, shaped (1, C, H, 1) to broadcast over W."""
    channels, height = x.shape[1], x.shape[2]
    rows = torch.arange(height, device=x.device, dtype=x.dtype)
    channel_pairs = torch.arange(0, channels, 2, device=x.device, dtype=x.dtype)
    freqs = torch.exp(-math.log(10000.0) * channel_pairs / channels)
    angles = rows[:, None] * freqs[None, :]
    encoding = torch.cat([angles.sin(), angles.cos()], dim=1)  # (H, C)
    return encoding.t()[None, :, :, None]


def hand_unet_a(height=32, width=24, batch=1):
    with _seeded():
        model = HandUNetA(height, width).eval()
        args = (torch.randn(batch, 4, height, width), torch.randn(batch, 5, 16))
    return model, args, {}


def hand_unet_b(height=32, width=24, batch=1):
    with _seeded():
        model = HandUNetB().eval()
        args = (torch.randn(batch, 3, height, width), torch.full((batch,), 500.0))
    return model, args, {}


FACTORIES = (tiny_sd15_unet, tiny_sdxl_unet, tiny_unet2d, hand_unet_a, hand_unet_b)
