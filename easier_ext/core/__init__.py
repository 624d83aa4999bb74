"""The bottom layer; imports nothing else of easier_ext but the compiled extension.

``ops`` (the fused op's wrappers, fake kernels and autograd) and ``gradients`` (each
activation's gradient: the Python side of the activation table); ``entropy_activation`` (the
base class of the tracked modules) and ``modules`` (the drop-in classes); ``entropy`` (counts to
entropies); ``sites`` (the site registry); helpers: ``shapes`` (per-channel views), ``checks``
(argument checks), ``files`` (atomic writes), ``runtime`` (device, autocast, progress, rank).
"""
