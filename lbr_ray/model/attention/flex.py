"""FlexAttention backend: the same rule as a BlockMask (model loaded with attn_implementation="flex_attention")."""
from __future__ import annotations

from lbr_ray.layout import positions
from lbr_ray.model.masks import flex_block_mask


def flex_hidden(decoder, ids, seg, ib: bool = True, sink: bool = True):
    mask = flex_block_mask(seg, ib, sink)
    return decoder(input_ids=ids, attention_mask=mask, position_ids=positions(seg), use_cache=False).last_hidden_state
