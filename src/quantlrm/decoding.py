"""Greedy decoding of one prompt at the speed the kernels allow: static KV cache, the one-token
step compiled and replayed as a CUDA graph, no host sync per token.

`model.generate(..., cache_implementation="static")` runs the same compiled step, but its loop
does host work and a device sync per token (stopping criteria, logits processors): on an H100
that cost 1.3-1.7 ms a token for an 8B model (W4: 4.86 against 3.33 ms, 206 against 300
tok/s, BENCHMARKS.md, Kernels). This loop keeps the token on the device, checks for EOS every
`check_every` tokens, and trims what came after it.

Greedy only, batch 1: for sampling or batches use `model.generate`.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import nn

from quantlrm.errors import QuantLRMError

_ROUND = 256  # cache lengths are rounded up, so one captured graph serves many prompt lengths


def cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Decoder:
    """A model's static cache and its captured decode step, reusable across prompts.

    On CUDA the step is compiled (`compile`) and captured as a CUDA graph (`graph`); elsewhere
    it runs eagerly. `max_len` bounds prompt + new tokens.
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = True, graph: bool = True):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.max_len = max_len
        on_cuda = self.device.type == "cuda"
        # A sliding-window cache layer keeps its length in a Python int (next position, mask
        # offset, when to roll), which a compiled or captured step would freeze: wrong tokens
        # from the second step on. While prompt + new tokens fit the window, the window never
        # acts, so full-attention cache layers give the same tokens; beyond it, decode eagerly.
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        self.cache = StaticCache(config=cfg, max_cache_len=max_len)
        eager_only = False
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            if window is not None and max_len <= window:
                full = copy.deepcopy(cfg)
                full.sliding_window = None
                if getattr(full, "layer_types", None):
                    full.layer_types = ["full_attention"] * len(full.layer_types)
                self.cache = StaticCache(config=full, max_cache_len=max_len)
            else:
                eager_only = on_cuda and (compile or graph)
                if eager_only:
                    warnings.warn(f"prompt + new tokens ({max_len} with rounding) exceed the sliding window "
                                  f"({window}); decoding eagerly (no compile, no CUDA graph)", stacklevel=3)
        # torch.compile fuses the small ops of the one-token step (norms, residuals); each
        # quantized linear stays one opaque custom op (quantlrm::qmatmul)
        # (the greedy pick too, as `greedy`: two reductions of a few us, where eager's argmax
        # over the vocabulary took 35 us on an H100 and inductor's single one 28-30 us)
        self.compiled = compile and on_cuda  # as asked (a failed capture keeps it: no retry per call)
        self.fwd = (torch.compile(self._next, dynamic=False, options=_inductor_options(self.device))
                    if self.compiled and not eager_only else self._next)
        self.use_graph = graph and on_cuda and not eager_only
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # Our attention reads a boolean mask; given one ready-made (and the positions), the
        # compiled step does not rebuild the causal mask from the cache length, which inductor
        # did once per layer (one launch each). Sliding layers (left only when decoding eagerly
        # past the window) need their own masks.
        self.mask = None
        if getattr(cfg, "_attn_implementation", None) == "quantlrm" and not any(
                getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            self.mask = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.kw = cache_kwarg(model)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One token: reads `tok`, writes the next one there. The cache writes at its own (tensor)
        length; `pos` goes along as the cache position (and, with our mask, as the position ids)."""
        if self.mask is not None:
            # this token's key joins the mask (clamped: capture's warm-up steps may run past the
            # cache's end, where the kernel writes nothing; prefill resets the mask after them)
            self.mask.view(-1).index_fill_(0, self.pos.clamp(max=self.max_len - 1), True)
        nxt = self.fwd(self.tok, self.pos, self.mask)
        self.tok.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        return nxt

    def _next(self, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The forward of one token and its greedy successor [1] (what gets compiled)."""
        kw = {self.kw: self.cache}
        if mask is not None:
            kw.update(attention_mask=mask, position_ids=pos.view(1, 1))
        out = self.model(input_ids=tok, cache_position=pos, use_cache=True, **kw)
        return greedy(out.logits[:, -1, :])

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt [1, p]; returns the first new token [1]."""
        self.cache.reset()
        p = ids.shape[1]
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.kw: self.cache},
                         cache_position=torch.arange(p, device=self.device))
        nxt = out.logits[:, -1, :].argmax(-1)
        self.tok.copy_(nxt.view(1, 1))
        self.pos.fill_(p)
        if self.mask is not None:
            self.mask.zero_()
            self.mask[..., :p] = True
        return nxt

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> None:
        """Compile and capture the step (warm-up steps on a side stream first: they compile and
        let the kernels tune their batch-1 configurations, which cannot happen during capture)."""
        self.prefill(ids)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        self.prefill(ids)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.out = self.step()
        self.graph = g

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int, eos_token_id: int | list[int] | None = None,
                 check_every: int = 16) -> torch.Tensor:
        """The new tokens [n <= new_tokens] for a prompt [1, p]; stops after the first EOS
        (kept in the output), checked every `check_every` tokens."""
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt + new tokens ({ids.shape[1]} + {new_tokens}) exceed max_len {self.max_len}")
        if self.use_graph and self.graph is None:
            try:
                self.capture(ids)
            except Exception as e:  # noqa: BLE001 -- a slower eager loop still gives the right tokens
                warnings.warn(f"compiling or capturing the decode step failed ({type(e).__name__}: {e}); "
                              "decoding eagerly", stacklevel=3)
                self.use_graph, self.fwd, self.graph = False, self._next, None
        eos = None if eos_token_id in (None, []) else torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=self.device)
        toks = torch.empty(new_tokens, dtype=torch.long, device=self.device)
        toks[0] = self.prefill(ids)[0]
        done_at = None
        for t in range(1, new_tokens + 1):
            if eos is not None and (t % check_every == 0 or t == new_tokens):
                hit = torch.isin(toks[:t], eos).nonzero()
                if hit.numel():
                    done_at = int(hit[0, 0]) + 1
                    break
            if t == new_tokens:
                break
            if self.graph is not None:
                self.graph.replay()
                toks[t] = self.out[0]
            else:
                toks[t] = self.step()[0]
        return toks[:done_at] if done_at is not None else toks


def _inductor_options(device: torch.device) -> dict:
    """Inductor's own kernels (norms, residuals, RoPE tables, the greedy pick) launched as
    programmatic dependent launches too (its `triton.enable_pdl`) when ours are
    (`quantlrm.kernels.pdl_enabled`), unless QUANTLRM_INDUCTOR_PDL is 0, false, off or no.
    Inductor (torch 2.11-2.13) puts a kernel's wait before its first read of what the kernel
    before it wrote, and before the kernel lets the next one launch, unless the kernel loads
    nothing; ours wait before reading anything but weights. So a read can only run ahead of an
    earlier kernel's write through an inductor kernel that loads nothing, which would then have
    no wait at all: `benchmarks/decode.py` and the GPU tests check that the decode step has none
    (`inductor_pdl_audit`). Off here is off in inductor too, whatever TORCHINDUCTOR_ENABLE_PDL says."""
    import torch._inductor.config as inductor_config

    from quantlrm.kernels import env_off, pdl_enabled

    if not hasattr(inductor_config.triton, "enable_pdl"):
        return {}
    return {"triton.enable_pdl": not env_off("QUANTLRM_INDUCTOR_PDL") and pdl_enabled(device)}


def greedy(logits: torch.Tensor, parts: int = 64) -> torch.Tensor:
    """argmax over the last dim of [B, V] (the first of equal maxima, as torch.argmax), as the
    maxima of `parts` chunks and then the best chunk: compiled, two reductions of many programs,
    where inductor's one argmax over a 128K vocabulary was a single program of 28-30 us on an
    H100 (BENCHMARKS.md, Kernels, version 10)."""
    v = logits.shape[-1]
    if v < 4 * parts:
        return logits.argmax(-1)
    pad = (-v) % parts
    if pad:
        logits = torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
    vals, idx = logits.view(logits.shape[0], parts, -1).max(dim=-1)  # [B, parts]
    best = vals.argmax(-1, keepdim=True)
    return (best * (logits.shape[-1] // parts) + idx.gather(-1, best)).squeeze(-1)


def _eos_ids(model: nn.Module) -> int | list[int] | None:
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    return eos if eos is not None else getattr(model.config, "eos_token_id", None)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 256,
             eos_token_id: int | list[int] | None = None, compile: bool = True) -> torch.Tensor:
    """Greedy continuation of one prompt: [1, p] -> [1, p + n] (n <= max_new_tokens), like
    `model.generate(input_ids, do_sample=False)` without its per-token host cost.

    The cache and captured graph are kept on the model and reused by later calls whose prompt
    plus new tokens fit (lengths are rounded up to multiples of 256). EOS defaults to the
    model's generation config; `eos_token_id=[]` never stops early. Works on CPU too (eagerly), where it is no faster.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise QuantLRMError(f"quantlrm.generate decodes one prompt; got input_ids of shape {tuple(input_ids.shape)}.",
                            "pass a [1, length] tensor, or use model.generate for batches.")
    if input_ids.shape[1] == 0 or input_ids.dtype not in (torch.long, torch.int32):
        raise QuantLRMError(f"input_ids must be a non-empty integer prompt; got shape {tuple(input_ids.shape)}, "
                            f"dtype {input_ids.dtype}.", "pass the tokenizer's ids (torch.long), at least one token.")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise QuantLRMError(f"input_ids hold token ids outside the model's vocabulary (0..{vocab - 1}).",
                            "tokenize with the model's own tokenizer.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QuantLRMError(f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}.",
                            "ask for one token or more.")
    device = next(model.parameters()).device
    if input_ids.device != device:
        input_ids = input_ids.to(device)
    need = input_ids.shape[1] + max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and need > limit:
        raise QuantLRMError(f"prompt + new tokens ({need}) exceed the model's max_position_embeddings ({limit}).",
                            "shorten the prompt or ask for fewer new tokens.")
    dec = getattr(model, "_quantlrm_decoder", None)
    if (dec is None or dec.max_len < need or dec.device != device
            or dec.dtype != model.get_input_embeddings().weight.dtype
            or dec.compiled != (compile and device.type == "cuda")):
        max_len = -(-need // _ROUND) * _ROUND
        if limit is not None:
            max_len = min(max_len, limit)
        dec = Decoder(model, max_len, compile=compile)
        model._quantlrm_decoder = dec
    eos = _eos_ids(model) if eos_token_id is None else eos_token_id
    new = dec.generate(input_ids, max_new_tokens, eos)
    return torch.cat([input_ids, new.view(1, -1)], dim=1)
