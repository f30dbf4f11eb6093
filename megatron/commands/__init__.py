"""CLI sub-commands: each module has ``register(subparsers)`` that adds its parser and sets ``func``.

Every command module is imported to build ``megatron --help``, so the modules that pull in torch, mmdet or
the training stack are imported inside the command functions (start-up time: ``--help`` and a config error
need neither torch nor mmdet, whose imports take seconds). Each command module says so with the comment
``# lazy imports: start-up time``.
"""
