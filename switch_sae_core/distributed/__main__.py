"""`torchrun --nproc_per_node=P -m switch_sae_core.distributed --config run.json` (see launch.py)."""
from .comm import exit_now
from .launch import main

exit_now(main())  # a finished run leaves without the interpreter's finalization, where gloo can abort
