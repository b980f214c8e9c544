"""``parallelize``: patch-parallel denoising and VAE decode for a diffusers pipeline in one call."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist

from .config import DistriConfig
from .runtime import reset, settle


def parallelize(pipe, split_vae: bool = True, **options):
    """Compile the pipeline's denoiser (``pipe.unet``, or ``pipe.transformer`` for SD3, PixArt and
    Flux; and ``pipe.controlnet``, where the pipeline has one) with ``backend="distri"`` and
    ``options``, and wrap ``pipe.__call__``.

    Flux's transformer takes the latent as packed tokens: each call names their grid, the latent's
    rows and columns over 2 (``token_grids`` for ``hidden_states`` and ``img_ids``, from the call's
    ``height`` and ``width`` or the pipeline's defaults), and ``pipe.transformer`` is the transformer
    compiled for that grid (once per image size). A ``token_grids`` option overrides it.

    ``split_vae`` (default on): ``pipe.vae.decode`` and ``pipe.vae.encode`` (which image-to-image
    pipelines call on their input image) are compiled too, in ``full_sync`` (exact; no warm-up,
    nothing stale), so the VAE also runs split across the ranks, every rank computing its own rows;
    its other options are ``options``' (lowering, group...). The decode is a collective, so every
    rank decodes. ``districompile.runtimes(pipe.vae.decode)`` are the decoder's compiled graphs.

    Every rank calls the pipeline with the same arguments (the same ``prompt_embeds``). Each
    call starts a new trajectory (``reset``), so the denoising steps need not wait for their checks
    (``host_checks="deferred"`` unless ``options`` say otherwise: read after the last step), shares one random seed across ranks when no
    ``generator`` or ``latents`` is given, shows the progress bar on rank 0 only, and returns
    the images as asked on rank 0. The other ranks get, with ``split_vae``, the same decoded
    images as a tensor (the pipeline's ``output_type="pt"``: (N, 3, H, W) in [0, 1], not
    converted to numpy or PIL); without it they skip the VAE and get the final latents
    (``output_type="latent"``). Returns ``pipe``.
    """
    # Each call begins with reset: new images are announced, so the hot path need not wait for its checks.
    options = {"host_checks": "deferred", **options}
    config = DistriConfig.from_options(options)  # unknown options raise here, naming them
    group = config.group or dist.group.WORLD
    rank = dist.get_rank(group)
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    # The controlnet's residuals come out whole on every rank; the UNet splits them again.
    names = [denoiser] + (["controlnet"] if getattr(pipe, "controlnet", None) is not None else [])
    models = [getattr(pipe, name) for name in names]
    # Flux's packed tokens split by their grid, which each call's height and width decide: its
    # transformer is compiled per grid, at the call.
    per_grid = _compiled_per_token_grid(pipe.transformer, options) if _packs_tokens(pipe) and "token_grids" not in options else None
    for name, model in zip(names, models):
        if per_grid is None or name != "transformer":
            setattr(pipe, name, torch.compile(model, backend="distri", options=options, dynamic=False))
    if split_vae:
        # The VAE's input is split by default (the latent, the image): spatial_inputs and token_grids name the denoiser's.
        vae_options = {k: v for k, v in options.items() if k not in ("spatial_inputs", "token_grids")}
        vae_options.update(sync_mode="full_sync", parallelism="patch")
        for name in ("decode", "encode"):
            compiled = torch.compile(_Method(getattr(pipe.vae, name)), backend="distri", options=vae_options, dynamic=False)
            # In the instance's __dict__, over the class's method: not a submodule, so the VAE's modules
            # and state_dict stay as they were.
            pipe.vae.__dict__[name] = compiled
            models.append(compiled)
    pipe.set_progress_bar_config(disable=rank != 0)
    call = type(pipe).__call__

    @functools.wraps(call)
    def parallel_call(self, *args, **kwargs):
        for model in models:
            reset(model)
        if per_grid is not None:
            self.transformer = per_grid(_flux_token_grid(self, call, args, kwargs))
        if kwargs.get("generator") is None and kwargs.get("latents") is None:
            seed = torch.randint(0, 2**31 - 1, (1,))
            dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))
        if rank != 0 and kwargs.get("output_type") != "latent":
            # A split decode needs every rank; the conversion to numpy or PIL is rank 0's alone.
            kwargs["output_type"] = "pt" if split_vae else "latent"
        result = call(self, *args, **kwargs)
        for model in models:  # the last step's deferred checks: their errors come with this call
            settle(model)
        return result

    # ``pipe(...)`` looks __call__ up on the class, so the pipeline gets a subclass of its own.
    pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {"__call__": parallel_call})
    return pipe


def _packs_tokens(pipe) -> bool:
    """A Flux pipeline: its transformer takes the latent packed in 2 x 2 patches, with their grid positions."""
    from diffusers import FluxTransformer2DModel

    return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)


def _compiled_per_token_grid(transformer, options):
    """Flux's transformer compiled for a token grid, once per grid (per image size)."""

    @functools.cache
    def compiled(grid: tuple[int, int]):
        token_grids = {"hidden_states": grid, "img_ids": grid}
        return torch.compile(transformer, backend="distri", options={**options, "token_grids": token_grids}, dynamic=False)

    return compiled


def _flux_token_grid(pipe, call, args, kwargs) -> tuple[int, int]:
    """The token grid of a Flux pipeline call: its latent (the image over ``vae_scale_factor``) in 2 x 2 patches,
    the height and width defaulted and rounded down as the pipeline does."""
    bound = inspect.signature(call).bind(pipe, *args, **kwargs).arguments
    default = pipe.default_sample_size * pipe.vae_scale_factor
    patch = pipe.vae_scale_factor * 2
    return (bound.get("height") or default) // patch, (bound.get("width") or default) // patch


class _Method(torch.nn.Module):
    """A module's method (``vae.decode``) as the forward of a module of its own: districompile keeps a
    compiled model's runtime on the compiled module, and ``reset`` and ``runtimes`` reach it there."""

    def __init__(self, method):
        super().__init__()
        self.method = method  # a bound method, not a submodule: this module has no parameters of its own

    def forward(self, *args, **kwargs):
        return self.method(*args, **kwargs)
