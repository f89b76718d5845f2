"""Recognise a weight's role in a transformer (q, k, v, o, gate, up, down) from its name.

The plots average ranks over layers of one type, so names from the common model families map
to one small vocabulary: Hugging Face LLaMA/Mistral/Qwen (``self_attn.q_proj``, ``mlp.gate_proj``),
GPT-2 (``attn.c_attn``, ``mlp.c_fc``), BERT/RoBERTa (``attention.self.query``,
``intermediate.dense``), Meta's LLaMA (``attention.wq``, ``feed_forward.w1``), T5
(``SelfAttention.q``, ``DenseReluDense.wi``) and ``nn.MultiheadAttention`` (``in_proj_weight``).
Anything else falls back to the name of the module that owns the weight, with block indices
dropped, so that ``blocks.0.ff.lin1.weight`` and ``blocks.7.ff.lin1.weight`` share the type
``lin1``.
"""

from __future__ import annotations

import re

# Canonical order used by tables and legends; types outside it follow alphabetically.
TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "down")

# (type, pattern) tried in order against the lower-cased module path (the parameter name without
# its trailing ".weight"). Context-dependent names come first: GPT-2's c_proj is the attention
# output under "attn" but the down projection under "mlp"; Meta LLaMA's wo is the attention
# output while T5's DenseReluDense.wo is the down projection.
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("qkv", r"(c_attn|qkv|qkv_proj|wqkv|query_key_value|in_proj)$"),
    ("o", r"(attn|attention|self_attn)\.(c_proj|proj|wo|o)$"),
    ("o", r"attention\.output\.dense$"),
    ("down", r"(mlp|feed_forward|ffn|densereludense)\.(c_proj|proj|wo|w2)$"),
    ("q", r"(^|\.)(q_proj|q|wq|query|to_q|q_lin)$"),
    ("k", r"(^|\.)(k_proj|k|wk|key|to_k|k_lin)$"),
    ("v", r"(^|\.)(v_proj|v|wv|value|to_v|v_lin)$"),
    ("o", r"(^|\.)(o_proj|out_proj|to_out(\.0)?|out_lin|wo|dense_out)$"),
    ("gate", r"(^|\.)(gate_proj|gate|w1|wg|w_gate)$"),
    ("up", r"(^|\.)(up_proj|up|w3|fc1|c_fc|fc_in|wi|wi_0|wi_1|lin1|intermediate\.dense)$"),
    ("down", r"(^|\.)(down_proj|down|w2|fc2|fc_out|lin2|output\.dense)$"),
)
_COMPILED = tuple((kind, re.compile(pattern)) for kind, pattern in _PATTERNS)


def layer_type(name: str) -> str:
    """Return the role of the parameter called ``name``: one of :data:`TYPE_ORDER` or a fallback.

    The fallback is the owning module's last non-numeric path component (``"net.2.weight"`` ->
    ``"net"``), or ``"other"`` when the name has none.
    """
    path = name.lower()
    for suffix in (".weight", "_weight"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    for kind, pattern in _COMPILED:
        if pattern.search(path):
            return kind
    parts = [part for part in path.split(".") if part and not part.isdigit()]
    return parts[-1] if parts else "other"


def type_sort_key(kind: str) -> tuple[int, str]:
    """Sort key putting the canonical types first in :data:`TYPE_ORDER`, then the rest by name."""
    if kind in TYPE_ORDER:
        return (TYPE_ORDER.index(kind), "")
    return (len(TYPE_ORDER), kind)
