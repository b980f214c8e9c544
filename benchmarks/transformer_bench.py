"""Time one diffusion-transformer call in each of these modes and print one table:

- ``eager``: the uncompiled transformer;
- ``default``, ``reduce-overhead``: ``torch.compile`` in that mode (reduce-overhead: with CUDA graphs);
- ``max-autotune-no-cudagraphs``: ``torch.compile`` benchmarking kernel choices for every matrix
  product as it compiles; not among the default modes: for a 12B model that is far slower than
  the other compiles, too slow for a device lease's 600-s call beside them; name it to run it;
- ``distri1``: ``backend="distri"`` (full_sync, ``token_grids`` naming the packed latent's grid)
  in a one-rank group, with its error against eager;
- ``projected``: one rank's program of an N-rank plan (``split_batch`` off; FLUX.1-dev takes no
  CFG pair) with every exchange replaced by a local stand-in, as ``unet_bench.py``'s: per-rank
  compute, no communication timed; with the bytes all ranks exchange per call, the stale buffers
  a rank keeps and its peak memory.

Under torchrun with several processes, ``distri`` runs for real at that world size instead.
On CUDA each mode also reports its peak memory (``peak GiB``: weights included).

Model ``flux``: FLUX.1-dev's transformer (``districompile.unets.FLUX_DEV``) with random weights,
bf16 by default; ``tiny``: its layout at width 32, for a CPU. Inputs per image size S, as
FluxPipeline passes them: the S/8 x S/8 latent packed in 2 x 2 patches, (S/16)^2 tokens of 64
channels, 512 text tokens, the pooled text embedding, img_ids/txt_ids, guidance 3.5, a timestep
in [0, 1]; batch 1 (FLUX.1-dev is guidance-distilled: no CFG pair).

**Memory with --jobs.** Each measurement's process holds its own weights: 22.2 GiB for ``flux``
in bf16 (11.9B parameters), plus its CUDA context, activations and CUDA graph pool: by estimate
(not measured yet) 1-3 GiB more, the peak GiB columns give each mode's. K workers hold about
K x 25 GiB at once: choose ``--jobs`` 3 at most on an H100 (80 GB) at 1024, 2 at 2048, and 4 on
an H200 (141 GB). Workers start K at a time in the order of ``--modes``: name the slow compiles
(distri1, projected, the compiled modes) first and eager last. Without ``--jobs`` one process
runs the modes one after another, each mode's peak including what the earlier ones still hold
(reduce-overhead's graphs).

    python benchmarks/transformer_bench.py --sizes 1024 --modes distri1 reduce-overhead default eager --jobs 3
    python benchmarks/transformer_bench.py --sizes 1024 --modes projected --worlds 2 4 --jobs 2
    python benchmarks/transformer_bench.py --model tiny --sizes 128 --dtype fp32 --lowering eager   # a CPU
"""

from __future__ import annotations

from common import DISTRI, DISTRI1, EAGER, PROJECTED, Benchmark, Case, compiled_mode, main

from districompile.unets import FLUX_DEV, TINY_FLUX, flux_transformer

MODELS = {"flux": FLUX_DEV, "tiny": TINY_FLUX}


def build(model: str, size: int, batch: int, dtype, device) -> Case:
    transformer, args, kwargs, token_grids = flux_transformer(MODELS[model], size, batch, dtype, device)
    return Case(transformer, args, kwargs, {"token_grids": token_grids})


BENCH = Benchmark(
    models=tuple(MODELS),
    build=build,
    modes={
        "eager": EAGER,
        "default": compiled_mode("default"),
        "max-autotune-no-cudagraphs": compiled_mode("max-autotune-no-cudagraphs"),
        "reduce-overhead": compiled_mode("reduce-overhead"),
        "distri1": DISTRI1,
        "projected": PROJECTED,
        "distri": DISTRI,
    },
    default_modes=("eager", "default", "reduce-overhead", "distri1", "projected"),
    dtypes=("bf16", "fp32"),
    default_worlds=(2, 4),
    results="transformer_{model}_{world}.json",
)


if __name__ == "__main__":
    main(BENCH, __doc__)
