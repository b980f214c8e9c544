"""``parallelize``: patch-parallel denoising for a diffusers pipeline in one call."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .config import DistriConfig
from .runtime import reset


def parallelize(pipe, **options):
    """Compile ``pipe.unet`` (and ``pipe.controlnet``, where the pipeline has one) with
    ``backend="distri"`` and wrap ``pipe.__call__``.

    Every rank calls the pipeline with the same arguments (the same ``prompt_embeds``). Each
    call starts a new trajectory (``reset``), shares one random seed across ranks when no
    ``generator`` or ``latents`` is given, shows the progress bar on rank 0 only, and returns
    the decoded images on rank 0; the other ranks skip the VAE and get the final latents
    (``output_type="latent"``). Returns ``pipe``.
    """
    config = DistriConfig.from_options(options)
    group = config.group or dist.group.WORLD
    rank = dist.get_rank(group)
    models = [pipe.unet] + ([pipe.controlnet] if getattr(pipe, "controlnet", None) is not None else [])
    pipe.unet = torch.compile(pipe.unet, backend="distri", options=options, dynamic=False)
    if len(models) > 1:  # its residuals come out whole on every rank; the UNet splits them again
        pipe.controlnet = torch.compile(pipe.controlnet, backend="distri", options=options, dynamic=False)
    pipe.set_progress_bar_config(disable=rank != 0)
    call = type(pipe).__call__

    @functools.wraps(call)
    def parallel_call(self, *args, **kwargs):
        for model in models:
            reset(model)
        if kwargs.get("generator") is None and kwargs.get("latents") is None:
            seed = torch.randint(0, 2**31 - 1, (1,))
            dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))
        if rank != 0:
            kwargs["output_type"] = "latent"
        return call(self, *args, **kwargs)

    # ``pipe(...)`` looks __call__ up on the class, so the pipeline gets a subclass of its own.
    pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {"__call__": parallel_call})
    return pipe
