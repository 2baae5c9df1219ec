"""The built-in tasks by name (``get_task`` and a dataset naming its task read it)."""

from fastcd.tasks.entity_tracking import EntityTracking
from fastcd.tasks.tom import CausalToM, TheoryOfMind

TASKS = {"entity-tracking": EntityTracking, "tom": TheoryOfMind, "tom-causaltom": CausalToM}
