"""One module per ``mammo`` subcommand (see :mod:`workspace.cli`)."""
