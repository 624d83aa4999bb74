"""The schedules on top of ``surgery``: the iteration loop (``schedule``) and its options
(``options``), ``easier`` and ``nepenthe``, NEPENTHE's ``pruning``, finetuning (``train``, with
its ``recipe``) and the run directory (``rundir``)."""
