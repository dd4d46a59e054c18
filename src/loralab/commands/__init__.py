"""One module per subcommand: argument parsing and orchestration on top of the services.

Each module exposes `register(subparsers)` and sets a `func` default; loralab/cli.py lists them.
Nothing heavy at import (torch, transformers, web frameworks load inside the commands), so
`loralab --help` stays fast.
"""
