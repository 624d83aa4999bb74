"""The bottom layer: the fused ops (``ops``), the entropy-tracking modules (``modules``), the
entropy arithmetic (``entropy``), the site registry (``sites``), and small shared helpers
(``checks``, ``files``). Imports nothing else of easier_ext but the compiled extension."""
