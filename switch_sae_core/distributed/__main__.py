"""`torchrun --nproc_per_node=P -m switch_sae_core.distributed --config run.json` (see launch.py)."""
import sys

from .launch import main

sys.exit(main())
