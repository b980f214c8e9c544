"""``districompile.unets``: the configs the examples, benchmarks and tests build their UNets from."""

import torch
from diffusers import UNet2DConditionModel

from districompile.unets import SDXL, TINY_SDXL, pooled_dim, sdxl_config, sdxl_time_ids


def test_sdxl_config_builds_sdxl_base_unet():
    with torch.device("meta"):  # shapes only: no 10 GB of weights
        unet = UNet2DConditionModel(**SDXL)
    # The parameter count of stabilityai/stable-diffusion-xl-base-1.0's UNet.
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert pooled_dim(SDXL) == 1280  # the second text encoder's pooled output


def test_scaled_down_configs_keep_sdxl_layout():
    layout = ("down_block_types", "up_block_types", "addition_embed_type", "use_linear_projection")
    assert {k: TINY_SDXL[k] for k in layout} == {k: SDXL[k] for k in layout}
    assert pooled_dim(sdxl_config(pooled_dim=48, time_embed_dim=8)) == 48


def test_sdxl_time_ids_are_pixel_sizes():
    ids = sdxl_time_ids(2, 128, 96)
    assert ids.tolist() == [[1024, 768, 0, 0, 1024, 768]] * 2  # original size, crop corner, target size
