"""Speed, memory and communication measurements of fsq (scripts, not tests)."""
