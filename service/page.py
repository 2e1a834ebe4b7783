"""The page a person opens at `/`: upload, options, live jobs, reports. Plain HTML and a little JS in
service/static/, no CDN; the option fields are filled in from the library's own choices, so the page
offers what the API accepts."""

from __future__ import annotations

from functools import cache
from html import escape
from pathlib import Path

from graphprune.config import COMPENSATIONS, RECOVERIES, STREAMS, TARGETS, PruneConfig
from graphprune.importance import CRITERIA

PLACEHOLDER = "<!--OPTIONS-->"


def _select(name: str, label: str, choices: tuple[str, ...], default: str) -> str:
    items = "".join(f'<option{" selected" if c == default else ""}>{escape(c)}</option>' for c in choices)
    return f'<label>{escape(label)}<select name="{name}" data-option="{name}">{items}</select></label>'


def _fields() -> str:
    d = PruneConfig()
    return "\n".join([
        f'<label>sparsity (fraction of the target removed)<input name="sparsity" data-option="sparsity" '
        f'type="number" min="0" max="0.99" step="0.05" value="{d.sparsity}"></label>',
        _select("target", "target", TARGETS, d.target),
        _select("criterion", "criterion", ("auto", *sorted(CRITERIA)), d.criterion),
        _select("compensate", "compensate removed channels", COMPENSATIONS, d.compensate),
        _select("recover", "recovery (fine-tuning)", RECOVERIES, d.recover),
        _select("streams", "residual streams (RMSNorm / pre-LN decoders)", STREAMS, d.streams),
        f'<label>round widths to a multiple of<input name="round_to" data-option="round_to" '
        f'pattern="[1-9][0-9]*|auto" title="a whole number, or auto: what this server\'s kernels prefer" '
        f'placeholder="auto (1 toward channels)" value="{d.round_to or ""}"></label>',
        '<label>input shapes (for dynamic inputs)<input name="input_shapes" data-option="input_shapes" data-json="1" '
        'placeholder="input=1,3,224,224"></label>',
        '<label class="check">rank units across groups<input name="global_ranking" data-option="global_ranking" '
        f'type="checkbox"{" checked" if d.global_ranking else ""}></label>',
        '<label class="check">allow approximate norms (LayerNorm widths)<input name="approximate_norms" '
        f'data-option="approximate_norms" type="checkbox"{" checked" if d.approximate_norms else ""}></label>',
    ])


@cache
def index() -> str:
    template = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
    return template.replace(PLACEHOLDER, _fields())
