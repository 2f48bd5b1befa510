"""torch.compile of the decode path, in one place: the backbone step and one item of each head, compiled where a
program sets up (as gpt-fast does), not inside the model. Prefill stays eager (its length varies).

    compile_decode(model)      # CUDA graphs on a GPU ("reduce-overhead"), inductor's default elsewhere
    warm_up(model, sampling)   # compile now, so that the first answer's timings are the steady state
"""

import logging
import warnings

import torch

from lfm2audio import LFM2Audio, Sampling

STEPS = ("decode_one", "text_step", "audio_step")


def compile_decode(model: LFM2Audio, mode: str | None = None) -> LFM2Audio:
    """Replace the model's three decode functions by compiled ones (instance attributes shadow the methods).
    One setting of a sampling value for all rows is a constant of its graph (each compiles once); per-row
    settings are tensors (one graph for all)."""
    import torch._inductor.config as inductor

    # inductor otherwise draws random numbers with its own generator: seeded sampling would differ from eager
    inductor.fallback_random = True
    # fused kernels round their intermediates to the model dtype where eager does, so compiled bf16 keeps
    # eager's greedy items far longer
    inductor.emulate_precision_casts = True
    cuda = model.lfm.embed_tokens.weight.is_cuda
    # on a CPU a C++ wrapper calls the ~600 kernels of an audio frame with less overhead than Python; built apart
    # from the kernels, it compiles much faster
    inductor.cpp_wrapper = inductor.cpp_wrapper_build_separate = not cuda
    mode = mode or ("reduce-overhead" if cuda else "default")
    for name in STEPS:
        fn = torch.compile(getattr(type(model), name).__get__(model), mode=mode, fullgraph=True)
        setattr(model, name, _own_outputs(fn) if mode == "reduce-overhead" else fn)
    model.fixed_shapes = True  # batch.py steps every cache row: one graph, not one per number of rows
    return model


def _own_outputs(fn):
    """With CUDA graphs a call's outputs live in the graph's memory, which a later replay overwrites: each call
    starts a new graph generation, and its outputs are copied out (a few KB)."""
    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, fn(*args))
    return call


@torch.no_grad()
def warm_up(model: LFM2Audio, sampling: Sampling = Sampling()):
    """Compile now, for as many rows as the caches have: one backbone step and one step of each head with
    `sampling` (its values are constants of the graphs). It writes position 0 of every cache row, which any
    answer's prefill rewrites. Inductor's notes on the
    operators it leaves to eager kernels (the depthformer's complex RoPE, sampling) are silenced."""
    torch._logging.set_logs(inductor=logging.ERROR)
    warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
    h = model.lfm.embed_tokens.weight.new_zeros(model.lfm.batch, model.cfg.dim)
    _, x = model.text_step(h, sampling.text_temperature, sampling.text_top_k)
    model.audio_step(h, sampling.audio_temperature, sampling.audio_top_k)
    model.decode_one(x, torch.zeros(len(h), 1, dtype=torch.long, device=h.device))
