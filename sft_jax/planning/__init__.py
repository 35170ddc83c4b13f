"""The pre-flight planner: compile from config.json alone, estimate memory and time, search."""
