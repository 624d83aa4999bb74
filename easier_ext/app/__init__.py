"""The command line and what only it needs: ``cli`` (the parser and ``main``), ``flags`` (the
schedules' options as flags), ``inputs`` (device, data, model, weights), ``run`` and ``commands``
(the subcommands); the built-in data (``data``, ``loaders``), the model builders (``models``);
the report (``report``, ``runlog``, ``plots``, ``formatting``)."""
