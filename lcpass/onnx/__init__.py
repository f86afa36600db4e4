"""The ONNX wing of ``lcpass.export``: lcpass attention ops as ONNX.

* :mod:`lcpass.onnx.common` — domains, opset, :class:`ONNXExportError`, the site configuration a function
  body depends on (:class:`AttentionFunction`), the body builder and the static-mask algebra;
* :mod:`lcpass.onnx.maskmod` — a mask_mod as ONNX ops, from the same trace the Triton printer reads;
* :mod:`lcpass.onnx.attention` — one ``lcpass``-domain function per site configuration (ONNX
  ``Attention`` with the method's mask built in-graph, or ``com.microsoft.GroupQueryAttention`` for a
  pure sliding window) and the translation table ``torch.onnx.export`` uses;
* :mod:`lcpass.onnx.dynamic` — the block top-k dynamic methods' selection in standard ops, from each
  method record's ``onnx`` lowering;
* :mod:`lcpass.onnx.sparse` — ``com.microsoft.SparseAttention`` for block-aligned static layouts
  (``onnx_ops="ort"``) and running such a model with shared KV buffers.

Import order: common <- maskmod, dynamic <- sparse <- attention (no circle).
"""
from lcpass.onnx.attention import attach_functions, function_proto, precheck, pure_sliding_window, translation_table
from lcpass.onnx.common import DOMAIN, MS_DOMAIN, OPSET, AttentionFunction, ONNXExportError
from lcpass.onnx.dynamic import onnx_methods
from lcpass.onnx.sparse import run_with_kv_buffers

__all__ = ["DOMAIN", "MS_DOMAIN", "OPSET", "AttentionFunction", "ONNXExportError", "attach_functions",
           "function_proto", "onnx_methods", "precheck", "pure_sliding_window", "run_with_kv_buffers",
           "translation_table"]
