"""`python -m leader.train train|export|embed ...` (and `torchrun -m leader.train train ...`)."""
from leader.train.commands import main

main()
