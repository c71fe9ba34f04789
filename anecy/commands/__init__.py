"""The subcommands of ``anecy``: one module each, listed in ``anecy.cli.COMMANDS``.

Each module has ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``
(the exit status). User errors are raised as ``anecy.errors.AnecyError``; the dispatcher
prints them as one line and exits with status 2. Heavy imports go inside ``run``, so that
``anecy --help`` stays fast."""
