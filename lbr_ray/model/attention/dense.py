"""Reference backend: the full visibility matrix as a 4-D additive mask."""
from __future__ import annotations

from lbr_ray.layout import positions
from lbr_ray.model.masks import dense_mask


def dense_hidden(decoder, ids, seg, ib: bool = True, sink: bool = True, output_attentions: bool = False):
    mask = dense_mask(seg, decoder.get_input_embeddings().weight.dtype, ib, sink)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions(seg), use_cache=False,
                  output_attentions=output_attentions)
    return (out.last_hidden_state, out.attentions) if output_attentions else out.last_hidden_state
