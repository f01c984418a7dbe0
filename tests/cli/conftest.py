"""tests/cli: the command line as a user meets it (portability, flags, output); real subprocesses."""
