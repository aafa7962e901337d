"""One module per `vgrt` subcommand; each imports its heavy dependencies inside `run`."""
