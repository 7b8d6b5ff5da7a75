"""Per-architecture facts as data: which linears a decoder layer has, which share an input,
what op precedes them (so 1/s can be folded into it), and which module's output the
scale search measures. Adding a family is one table entry; nothing else tests class names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlrm.errors import QuantLRMError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, scaled together by one vector s.

    `prev` is the op whose output is that input; 1/s is folded into it (a norm's weight,
    or the output rows of a linear). `inspect` is the module whose output the search
    compares before/after quantization. `importance_from` is whose signal the authors use
    for the whole group (SPEC 1b).
    """

    name: str
    prev: str
    prev_kind: str  # "norm" | "linear"
    linears: tuple[str, ...]
    inspect: str
    importance_from: str


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    linears: dict[str, str]  # short name -> path inside a decoder layer
    scale_groups: tuple[ScaleGroup, ...]
    layers_prefix: str = "model.layers"
    # linears called on the same tensor, in this order (one fused launch at inference)
    shared_inputs: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))
    # (gate, up, down) of a gated MLP, down(act(gate(x)) * up(x)): at inference gate and up
    # run as one launch that also applies the activation (SiLU only)
    gated_mlp: tuple[str, str, str] | None = ("gate", "up", "down")
    # attention as Llama's: rotate_half RoPE over the whole head, optional per-head q/k RMS
    # norms (x * w) before it; only then may `fuse_decode_attention` replace its decode step
    fused_decode_attention: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    def linear_path(self, layer: int, short: str) -> str:
        return f"{self.layers_prefix}.{layer}.{self.linears[short]}"

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}."


_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

_QKV = ScaleGroup("qkv", "input_layernorm", "norm", ("q", "k", "v"), "self_attn", "q")
# Under grouped-query attention v_proj has fewer output rows than o_proj has inputs:
# the search ties s across the query heads of each KV head so it can be folded into v.
_VO = ScaleGroup("o", "self_attn.v_proj", "linear", ("o",), "self_attn.o_proj", "o")
_GATE_UP = ScaleGroup("gate_up", "post_attention_layernorm", "norm", ("gate", "up"), "mlp", "gate")
_DOWN = ScaleGroup("down", "mlp.up_proj", "linear", ("down",), "mlp.down_proj", "down")

PRE_NORM = Arch(
    name="llama-like (pre-norm)",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    linears=_LINEARS,
    scale_groups=(_QKV, _VO, _GATE_UP, _DOWN),
    # Qwen3's q_norm/k_norm act on q/k outputs, so scaling their inputs stays legal.
    fused_decode_attention=True,
    note="R1-Distill-Llama, R1-Distill-Qwen, Qwen3, Mistral",
)

POST_NORM = Arch(
    name="olmo (post-norm)",
    model_types=("olmo2", "olmo3"),
    linears=_LINEARS,
    # OLMo 2/3 normalise the block *outputs*: no norm precedes q/k/v or gate/up, so only
    # the linear->linear pairs v->o and up->down can absorb a scale.
    scale_groups=(_VO, _DOWN),
    note="OLMo-2, Olmo-3 (Think, Instruct)",
)

ARCHS: tuple[Arch, ...] = (PRE_NORM, POST_NORM)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def get_arch(config: dict) -> Arch:
    """Look up the table entry for a config.json dict; unknown models get a clear error."""
    mt = config.get("model_type")
    for a in ARCHS:
        if mt in a.model_types:
            return a
    raise QuantLRMError(
        f"model_type {mt!r} is not supported.",
        f"supported model types: {', '.join(supported_model_types())}; "
        "adding one is an entry in quantlrm/arch.py.",
    )


def num_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


def attention_shape(config: dict) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) from a config dict."""
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
    return n_heads, n_kv, head_dim


def linear_names(config: dict) -> list[tuple[int, str, str]]:
    """Every quantizable linear as (layer, short name, full tensor prefix without .weight)."""
    arch = get_arch(config)
    return [
        (layer, short, arch.linear_path(layer, short))
        for layer in range(num_layers(config))
        for short in arch.linears
    ]
