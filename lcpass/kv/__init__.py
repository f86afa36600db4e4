"""KV-compressed generation: a cache that frees what each head's method evicts, decode-time selection,
and bounded appends for plain-graph (functional) caches.

* :class:`CompressedCache` — transformers ``Cache``; ``generate()`` on an ``lcpass.optimize``-d model uses
  it automatically; ``cache.nbytes()`` / ``cache.breakdown()`` report the memory really held.
* :class:`Selector` — Quest, TokenSelect, Recycled Attention, TidalDecode at decode time.
* :func:`bound_cache_appends` — rewrites ``torch.cat`` KV appends of plain graphs into bounded ones.

Example::

    >>> model = lcpass.optimize(model, method="streaming", sink=4, window=1020)
    >>> out = model.generate(ids, max_new_tokens=64, return_dict_in_generate=True)
    >>> out.cache.nbytes()
"""
from lcpass.kv.cache import CompressedCache, compress_cache, plan_label
from lcpass.kv.group import KVGroup, tensor_bytes
from lcpass.kv.layer import CompressedLayer
from lcpass.kv.select import Selector

__all__ = ["CompressedCache", "CompressedLayer", "KVGroup", "Selector", "compress_cache", "plan_label", "tensor_bytes"]
