"""`torchrun --nproc_per_node=P -m switch_sae_core.distributed --config run.json` (see launch.py)."""
from .comm import exit_after_failure
from .launch import main

exit_after_failure(main())  # a finished run leaves without the interpreter's finalization, where gloo can abort
