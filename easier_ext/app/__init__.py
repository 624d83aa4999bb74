"""The command line and what only it needs: ``cli``, the built-in data (``data``), the model
builders (``models``) and the report (``report``)."""
