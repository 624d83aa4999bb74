"""Model surgery on top of ``core``; imports ``core`` only.

- tracing: ``tracing`` (the one entry to torch.fx, rectifier tables), ``faithful`` (traces checked
  to compute what the forward does);
- ``convert`` and ``converted`` (call sites become tracked modules), ``measure`` (entropy over
  data), ``linearize``, ``masks`` (pruning made permanent);
- merging: ``chains`` (which runs of layers to merge), ``merge``, ``impulses`` and
  ``conv_geometry`` (the exact composition), ``macs`` (the one MAC cost model);
- ``fold`` and its passes ``fold_graph``, ``fold_static``, ``fold_sites``, ``fold_affine``,
  ``fold_constants``, ``fold_merges``;
- ``costs``, ``latency`` and ``inference`` (parameters, MACs, depth, timing), ``export`` (ONNX and
  ``torch.export`` files, checked).
"""
