"""The schedules on top of ``surgery``: the iteration loop (``schedule``), ``easier`` and
``nepenthe``, NEPENTHE's ``pruning``, finetuning (``train``) and the run directory (``rundir``)."""
