"""Model surgery on top of ``core``: tracing (``tracing``, ``faithful``), ``convert``, ``measure``,
``linearize``, conv/linear chains and their composition (``chains``, ``merge``), ``fold``,
``costs`` and ``export``. Imports ``core`` only."""
