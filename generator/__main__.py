# Tie this process to its supervisor before anything slow is imported (see generator/lifeline.py).
from generator.lifeline import hold_on_to_supervisor

hold_on_to_supervisor()

from generator.run import main  # noqa: E402

raise SystemExit(main())
